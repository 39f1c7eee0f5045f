"""The layering of DESIGN.md, checked: the core imports no kedro, no mlflow and nothing of the Kedro layer."""

import subprocess
import sys
from pathlib import Path


def test_the_import_contract_holds():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
