"""The documentation: the site builds with --strict, renders in a browser, and documents every public object."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import pytest

from tests.browser import browser, free_port, rendered, serve
from tests.conftest import PROJECT_ROOT

# How a project speaks of how it was made, which its docs must not (they say what the software does)
PROCESS_LANGUAGE = re.compile(r"this task|this session|to this task|issue #\d|\bTODO\b|the agent", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as `make docs` builds it: --strict turns a broken link, a missing page or a docstring that does
    not render into an error."""
    target = tmp_path_factory.mktemp("site")
    process = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(target)],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert process.returncode == 0, process.stderr[-4000:]
    return target


def test_site_builds_strictly_with_every_page_of_the_navigation(site):
    for page in ("index.html", "getting_started/index.html", "ppo_max/index.html", "results/ablation/index.html",
                 "reference/rl/index.html", "pipelines/ppo/index.html"):
        assert (site / page).exists(), page
    api = (site / "reference/rl/index.html").read_text()
    assert 'id="rlhf_pipeline.rl.ppo_max.masked_whiten"' in api  # the anchor every cross-reference points at


@pytest.mark.skipif(browser() is None, reason="no headless Chromium here (Debian: apt-get install chromium)")
def test_front_page_and_an_api_page_render_in_a_browser(site):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], site, f"{url}/")
    try:
        front = rendered(f"{url}/")
        assert "Headline result" in front and "PPO-max (<code>ppo_max</code>)" in front  # the generated table
        assert 'src="results/img/ablation_gold_score.png"' in front
        api = rendered(f"{url}/reference/rl/")
        # a docstring rendered: the signature, and its prose with the equation's source
        assert "masked_whiten" in api and "Generalised advantage estimation" in api
        assert "md-nav" in api  # Material's navigation, built by its scripts
    finally:
        server.terminate()
        server.wait(timeout=30)


def core_modules():
    """Every module of the core: the packages the import-linter contract keeps free of kedro and mlflow."""
    tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11
    contract = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    for name in contract["source_modules"]:
        module = importlib.import_module(name)
        yield module
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{name}."):
            if not info.name.endswith("__main__"):
                yield importlib.import_module(info.name)


def test_every_public_function_and_class_of_the_core_has_a_docstring():
    missing = []
    for module in core_modules():
        if not (module.__doc__ or "").strip():
            missing.append(module.__name__)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                doc = value.__doc__ or ""
                if not doc.strip() or (inspect.isclass(value) and doc.startswith(f"{name}(")):  # dataclass default
                    missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(value):
                missing += [f"{module.__name__}.{name}.{method}" for method, member in vars(value).items()
                            if not method.startswith("_") and inspect.isfunction(member)
                            and not (member.__doc__ or "").strip()]
    assert not missing, f"public objects without a docstring: {missing}"


def test_the_docs_say_what_the_software_does_not_how_it_was_made():
    pages = [PROJECT_ROOT / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md")]
    pages += sorted((PROJECT_ROOT / "docs").rglob("*.md"))
    found = [f"{page.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}" for page in pages
             for number, line in enumerate(page.read_text().splitlines(), 1) if PROCESS_LANGUAGE.search(line)]
    assert not found, "\n".join(found)
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= 200  # a front page, not a notebook
