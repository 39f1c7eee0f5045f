"""The layering of DESIGN.md, checked: the core imports no kedro, no mlflow and nothing of the Kedro layer; no
pipeline imports another; building the pipelines (``kedro registry list``, ``kedro viz``) imports no torch."""

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).parents[1]


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_building_the_pipelines_imports_no_torch():
    """What ``kedro registry list`` does: the settings, the hooks and every registered pipeline; in a fresh
    interpreter, so that no other test's imports count."""
    script = ("import sys\n"
              "from kedro.framework.project import configure_project\n"
              "configure_project('rlhf_pipeline')\n"
              "from rlhf_pipeline import settings\n"
              "from rlhf_pipeline.pipeline_registry import register_pipelines\n"
              "pipelines = register_pipelines()\n"
              "assert len(pipelines['ablation'].nodes) > len(pipelines['__default__'].nodes)\n"
              "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
