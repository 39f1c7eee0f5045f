"""Kedro hooks: every stage's settings built before the run's first node, lineage in MLflow, and provenance.

``SettingsCheckHook`` builds the typed config of each stage the run includes from the run's parameters, so
that a bad value (``ppo.vanilla.sampling.temperature: 0``, ``reward_model.stats_sample: 0``) fails the run in
seconds, naming its key, instead of after the stages before it have trained.

Lineage in MLflow is declared in the catalog and recorded by ``MlflowLineageHook``:

* A dataset with ``metadata: {mlflow: {context: training}}`` (or ``validation``, ``evaluation``) is logged as
  an MLflow dataset input of the run each time a node loads it (``mlflow.log_input``: name = the catalog
  entry, source = its file, digest of its content), so a run's Datasets panel lists the splits it read and
  two runs on different data differ by digest.
* A model dataset with ``metadata: {mlflow: {registered_model: rlhf-sft}}`` is logged as an MLflow model
  when saved (the ``transformers`` flavour for a causal LM; a ``pyfunc`` that scores (prompt, response)
  pairs for a value-head reward model) and registered as a new version of that name, tagged with the
  catalog entry and version it was saved as, the variant and the registered versions of the models its
  node read (``parent.<dataset>``). A later run that loads a model dataset finds its registered version
  by that catalog version and records it as a run tag (``input_model.<dataset>``), so stage-by-stage runs
  stay linked.
* When the dataset with ``metadata: {mlflow: {champion: true}}`` is saved (the output of the evaluation's
  ``select_champion`` node, which makes the choice), the chosen policy's registered version gets the alias
  ``champion``: ``mlflow.transformers.load_model("models:/rlhf-policy@champion")`` loads it.

``ProvenanceHook`` records, for every dataset a run saves, the date, commit, command and machine
(``rlhf_pipeline.provenance``) in ``data/08_reporting/provenance.json``, which stamps the results pages.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from kedro.framework.hooks import hook_impl
from kedro.framework.project import settings
from kedro.pipeline import Pipeline

from rlhf_pipeline.provenance import PROVENANCE_FILE, provenance, read_records, record_saved

logger = logging.getLogger(__name__)

CATALOG_VERSION_TAG = "kedro.catalog_version"
DATASET_TAG = "kedro.dataset"
CHAMPION = "champion"
EXAMPLE_PROMPT = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"  # the input example of every logged model


def settings_builders(parameters: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Parameter key -> the function its node builds its typed settings with (each given the run's ``launcher``)."""
    # imported here, not at the top: the Kedro wiring imports no torch (the core does)
    from rlhf_pipeline.config import config_from
    from rlhf_pipeline.generation import SamplingConfig
    from rlhf_pipeline.launch import PPOSettings, SFTSettings
    from rlhf_pipeline.launch.reward import RewardModelSettings
    from rlhf_pipeline.pipelines.data_processing.nodes import source_formats
    from rlhf_pipeline.pipelines.studies.nodes import check_study, row_settings

    launcher = parameters.get("launcher") or {}

    def ppo(params: dict[str, Any], variant: str) -> None:
        PPOSettings.from_params(params, launcher, variant)

    def study(params: dict[str, Any], name: str) -> None:
        check_study(params, name, settings.STUDIES[name].rows, parameters.get("evaluation"))
        for row in settings.STUDIES[name].rows:
            row_settings(parameters["ppo"], params, launcher, study=name, row=row, seed=settings.STUDIES[name].seeds[0])

    return {
        "sft": lambda params: SFTSettings.from_params(params, launcher),
        "reward_model": lambda params: RewardModelSettings.from_params(params, "reward_model", launcher),
        **{f"ppo.{variant}": partial(ppo, variant=variant) for variant in parameters.get("ppo", {})},
        "data_processing": source_formats,
        "evaluation": lambda params: config_from(SamplingConfig, params["sampling"]),
        "evaluation.judge": lambda params: RewardModelSettings.from_params(params, "evaluation.judge", launcher),
        **{name: partial(study, name=name) for name in settings.STUDIES},
    }


def parameter(parameters: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (``ppo.vanilla``), None where it is absent."""
    for part in key.split("."):
        parameters = parameters.get(part) if isinstance(parameters, dict) else None
    return parameters


def check_settings(parameters: dict[str, Any], pipeline: Pipeline) -> None:
    """Build the typed configs of every stage whose parameters ``pipeline`` reads (``params:ppo`` covers each
    ``ppo.<variant>``; a study's rows are built from ``params:<study>``).

    Raises:
        ValueError: A setting a stage would reject, prefixed with its parameter key and file.
    """
    read = {name.removeprefix("params:") for name in pipeline.inputs() if name.startswith("params:")}
    for key, build in settings_builders(parameters).items():
        value = parameter(parameters, key)
        prefixes = [".".join(key.split(".")[:depth]) for depth in range(1, key.count(".") + 2)]
        if value is None or not read.intersection(prefixes):
            continue
        try:
            build(value)
        except (ValueError, TypeError, KeyError) as error:
            reason = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            where = (f"the run's launcher in parameters.yml, or {key}.launcher,"
                     if reason.startswith(("launcher", "LaunchConfig")) else
                     f"parameters_{'studies' if key in settings.STUDIES else key.split('.')[0]}.yml")
            raise ValueError(f"parameters '{key}' ({where} of conf/base or the run's environment, or --params): "
                             f"{reason}") from error


class SettingsCheckHook:
    """Builds every stage's typed settings from the run's parameters before the first node runs (and before
    kedro-mlflow opens the run's MLflow run, so that a refused run leaves none behind)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog) -> None:
        check_settings(catalog.load("parameters"), pipeline)


def lineage_of(catalog, dataset_name: str) -> dict[str, Any]:
    """The ``mlflow`` section of a catalog entry's metadata (dataset factories resolved)."""
    return dict((getattr(catalog.get(dataset_name), "metadata", None) or {}).get("mlflow") or {})


def catalog_version(catalog, dataset_name: str, saved: bool) -> str | None:
    dataset = catalog.get(dataset_name)
    if not hasattr(dataset, "resolve_save_version"):
        return None
    return dataset.resolve_save_version() if saved else dataset.resolve_load_version()


def registered_version(name: str, dataset_name: str, version_tag: str | None):
    """The registered version of model ``name`` that catalog entry ``dataset_name`` saved as catalog version
    ``version_tag`` (None if none). One run's saves share a catalog version, hence the entry's name too."""
    if version_tag is None:
        return None
    found = mlflow.MlflowClient().search_model_versions(
        f"name = '{name}' and tags.`{CATALOG_VERSION_TAG}` = '{version_tag}' and tags.`{DATASET_TAG}` = '{dataset_name}'")
    return max(found, key=lambda v: int(v.version)) if found else None


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """A value-head reward model as an MLflow pyfunc: a DataFrame of ``prompt``/``response`` -> scores."""

    def load_context(self, context) -> None:
        from rlhf_pipeline.modeling import load_value_model

        self.bundle = load_value_model(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[float]:
        from rlhf_pipeline.formatting import context_length
        from rlhf_pipeline.training.reward import score_responses

        scores = score_responses(self.bundle.model, self.bundle.encoder(), model_input["prompt"].tolist(),
                                 model_input["response"].tolist(), max_length=context_length(self.bundle.model.config))
        return scores.tolist()


def log_model(bundle, name: str, artifact_name: str):
    """Log ``bundle`` (a ``ModelBundle``) as an MLflow model registered under ``name``; returns the version."""
    import torch
    import transformers

    from rlhf_pipeline.modeling import ValueHeadModel

    # stated, not inferred: inference would load the model again in a subprocess
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    if isinstance(bundle.model, ValueHeadModel):
        with tempfile.TemporaryDirectory() as folder:
            bundle.save_pretrained(folder)
            info = mlflow.pyfunc.log_model(
                name=artifact_name, python_model=RewardModelPyfunc(), artifacts={"model": folder},
                registered_model_name=name, pip_requirements=requirements,
                input_example=pd.DataFrame({"prompt": [EXAMPLE_PROMPT], "response": ["2 plus 3 is 5."]}))
    else:
        encoder = bundle.encoder()  # the example in the model's own prompt format (a chat template, say)
        prompt = encoder.tokenizer.decode(encoder.sampling_prompt(EXAMPLE_PROMPT, 64, 1) or [])
        info = mlflow.transformers.log_model(
            transformers_model={"model": bundle.model, "tokenizer": bundle.tokenizer}, name=artifact_name,
            task="text-generation", registered_model_name=name, pip_requirements=requirements, input_example=prompt)
    return mlflow.MlflowClient().get_model_version(name, str(info.registered_model_version))


class MlflowLineageHook:
    """Records dataset inputs, registered models, their parents and the champion policy (module docstring)."""

    def __init__(self) -> None:
        self.catalog = None
        self.read_models: dict[str, dict[str, str]] = {}  # node name -> {dataset: "model/version"}
        self.policies: dict[str, Any] = {}  # dataset name -> registered version, this run

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self.catalog = catalog

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node) -> None:
        if self.catalog is None or mlflow.active_run() is None:
            return
        lineage = lineage_of(self.catalog, dataset_name)
        if lineage.get("context") and isinstance(data, pd.DataFrame) and not data.empty:  # MLflow cannot hash none
            source = str(getattr(self.catalog.get(dataset_name), "_filepath", dataset_name))
            mlflow.log_input(mlflow.data.from_pandas(data, source=source, name=dataset_name), context=lineage["context"])
        if lineage.get("registered_model"):
            version = registered_version(lineage["registered_model"], dataset_name,
                                         catalog_version(self.catalog, dataset_name, False))
            if version is not None:
                reference = f"{version.name}/{version.version}"
                self.read_models.setdefault(node.name, {})[dataset_name] = reference
                mlflow.set_tag(f"input_model.{dataset_name}", reference)
                if lineage.get("policy"):
                    self.policies[dataset_name] = version

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self.catalog is None or mlflow.active_run() is None:
            return
        lineage = lineage_of(self.catalog, dataset_name)
        if lineage.get("registered_model"):
            self.register(dataset_name, data, node, lineage)
        if lineage.get("champion") and data:
            self.crown(data)

    def register(self, dataset_name: str, bundle, node, lineage: dict[str, Any]) -> None:
        name = lineage["registered_model"]
        version = log_model(bundle, name, dataset_name.replace(".", "_"))
        tags = {CATALOG_VERSION_TAG: catalog_version(self.catalog, dataset_name, True) or "",
                DATASET_TAG: dataset_name,
                **{f"parent.{k}": v for k, v in self.read_models.get(node.name, {}).items()},
                **{k: str(v) for k, v in (lineage.get("tags") or {}).items()},
                **({"origin": bundle.origin} if getattr(bundle, "origin", None) else {})}
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        mlflow.set_tag(f"output_model.{dataset_name}", f"{name}/{version.version}")
        if lineage.get("policy"):
            self.policies[dataset_name] = version
        logger.info("Registered %s as %s version %s", dataset_name, name, version.version)

    def crown(self, champion: dict[str, Any]) -> None:
        """Alias the registered version of the policy that ``select_champion`` chose (``{"policy", "by",
        "value"}``) ``champion``; a policy this run neither trained nor read is logged and left alone."""
        version = self.policies.get(f"ppo.{champion['policy']}.policy")
        if version is None:
            logger.warning("Champion %s has no registered version in this run; no alias set", champion["policy"])
            return
        mlflow.MlflowClient().set_registered_model_alias(version.name, CHAMPION, version.version)
        mlflow.set_tag("champion", f"{version.name}/{version.version} ({champion['policy']}, {champion['by']} "
                                   f"{champion['value']:.3f})")
        logger.info("Champion: %s version %s (%s)", version.name, version.version, champion["policy"])


class ProvenanceHook:
    """Records, as each dataset is saved, the run's date, commit, command, machine and environment in the
    project's ``data/08_reporting/provenance.json`` (``rlhf_pipeline.provenance``), keeping the records of
    datasets this run does not save (a run of one stage or one study row leaves the others' as they were)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.project: Path | None = None
        self.record: dict[str, Any] | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        """Locate the provenance file under the project."""
        self.project = Path(context.project_path)
        self.path = self.project / PROVENANCE_FILE

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        """Take the run's record, and read the file once so that a corrupt one fails now, naming itself."""
        if self.path is not None:
            read_records(self.path)
            self.record = {**provenance(path=self.project), "env": run_params.get("env")}

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        """Record the run as the producer of ``dataset_name``."""
        if self.path is not None and self.record is not None:
            record_saved(self.path, dataset_name, self.record)
