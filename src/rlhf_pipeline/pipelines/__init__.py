"""The Kedro layer's pipelines, one package per stage (none imports another; ``pipeline_registry`` composes them)."""

from functools import partial, update_wrapper


def bound(function, **keywords):
    """``function`` with ``keywords`` fixed, keeping its name and docstring (what Kedro and kedro-viz show)."""
    return update_wrapper(partial(function, **keywords), function)
