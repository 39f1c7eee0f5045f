"""Where a figure comes from: the date, the commit, the command and the machine that produced it.

Every generated result carries one such record: the benchmarks write it into their JSON (``--json``), the Kedro
layer's ``ProvenanceHook`` records it for every dataset a run saves (``data/08_reporting/provenance.json``), and
``rlhf_pipeline.report`` stamps each results page with the records of the files it reads.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit(path: str | Path = ".") -> str | None:
    """The short commit hash checked out at ``path``, with ``-dirty`` when tracked files differ from it; ``None``
    outside a git work tree or without ``git``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()`` or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine: OS and architecture, CPU model and core count, and each CUDA GPU torch sees
    (none when torch is not imported yet or sees no GPU: importing torch here would cost seconds)."""
    parts = [f"{platform.system()} {platform.machine()}", f"{os.cpu_count()} CPU cores ({cpu_name()})"]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        parts += [f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"]
    else:
        parts += ["no GPU"]
    return ", ".join(parts)


def provenance(command: list[str] | None = None, path: str | Path = ".") -> dict[str, Any]:
    """``{"date", "commit", "command", "machine"}`` for a result produced now: the UTC date and time (ISO 8601,
    seconds), :func:`git_commit` of ``path``, ``command`` (default: this process's ``sys.argv``, the program named
    by its file name, or ``python -m PACKAGE`` for a package's ``__main__.py``) quoted for a shell, and :func:`machine`."""
    argv = list(sys.argv if command is None else command)
    if argv:  # `kedro run ...` for the console script; `python -m kedro run ...` for a module run as a script
        program = Path(argv[0])
        argv[:1] = ["python", "-m", program.parent.name] if program.name == "__main__.py" else [program.name]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(path), "command": shlex.join(argv), "machine": machine()}
