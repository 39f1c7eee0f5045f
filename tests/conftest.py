"""Shared fixtures: a throw-away copy of the project for end-to-end `kedro run`s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipeline.training.engine import child_environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_project_copy(destination: Path) -> Path:
    """Copy what `kedro run` needs (conf, pyproject, empty data folders) into ``destination``."""
    for name in ("conf", "pyproject.toml", ".telemetry"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("local"))
        else:
            shutil.copy(source, destination / name)
    (destination / "conf" / "local").mkdir(exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "src", destination / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for layer in (PROJECT_ROOT / "data").iterdir():
        (destination / "data" / layer.name).mkdir(parents=True, exist_ok=True)
    return destination


def kedro(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the kedro CLI in ``project``; fail the test with its output if it fails."""
    # in-process tests joined a one-rank process group; the kedro run must form its own
    env = {**child_environment(), "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(
        [sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, f"kedro {' '.join(args)} failed:\n{process.stdout[-4000:]}\n{process.stderr[-8000:]}"
    return process


@pytest.fixture(scope="session")
def project_copy(tmp_path_factory) -> Path:
    """One project copy shared by the end-to-end tests (stages run in order build on each other)."""
    return make_project_copy(tmp_path_factory.mktemp("project"))
