"""Where a figure comes from: the date, the commit, the command and the machine that produced it.

Every generated result carries one such record: the benchmarks write it into their JSON (``--json``,
:func:`write_result`), the Kedro layer's ``ProvenanceHook`` records it for every dataset a run saves
(:data:`PROVENANCE_FILE`, :func:`record_saved`), and ``rlhf_pipeline.report`` stamps each results page with the
records of the files it reads (:func:`read_records`).
"""

from __future__ import annotations

import datetime
import fcntl
import json
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
    """One line naming the machine: OS and architecture, CPU model and core count, and the CUDA GPUs torch sees
    ("no GPU" when it sees none; "GPUs not probed" when torch is not imported: importing it here costs seconds)."""
    parts = [f"{platform.system()} {platform.machine()}", f"{os.cpu_count()} CPU cores ({cpu_name()})"]
    torch = sys.modules.get("torch")
    if torch is None:
        parts += ["GPUs not probed"]
    elif torch.cuda.is_available():
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


PROVENANCE_FILE = "data/08_reporting/provenance.json"  # under the project: dataset name -> the record of its save
RECORD_KEYS = ("date", "command", "machine")


def read_json(path: Path) -> Any:
    """``path`` parsed as JSON; ``ValueError`` naming the file when it is not."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` when it is a provenance record (an object whose ``date``, ``command`` and ``machine`` are
    strings, the date ISO 8601); ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in RECORD_KEYS):
        raise ValueError(f"{where}: a provenance record needs {list(RECORD_KEYS)} as strings, got {record!r}")
    try:
        datetime.datetime.fromisoformat(record["date"])
    except ValueError as error:
        raise ValueError(f"{where}: the provenance date {record['date']!r} is not ISO 8601") from error
    return record


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """A provenance file (:data:`PROVENANCE_FILE`): dataset name -> record; ``{}`` when it is absent.

    Raises:
        ValueError: the file is not JSON, not an object, or a record is not one (:func:`check_record`); the
            message names the file (and the dataset).
    """
    if not path.exists():
        return {}
    records = read_json(path)
    if not isinstance(records, dict):
        raise ValueError(f"{path}: expected an object of dataset name -> provenance record; delete it to start a "
                         "new record")
    return {name: check_record(record, f"{path}, the record of {name!r}") for name, record in records.items()}


def record_saved(path: Path, dataset: str, record: dict[str, Any]) -> None:
    """Set ``dataset``'s record in the provenance file at ``path``, keeping every other record. Runs saving at the
    same moment take turns through an exclusive lock on ``<path>.lock`` (``fcntl.flock``, POSIX), and the file is
    written whole and renamed into place, so a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        records = read_records(path)
        records[dataset] = record
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(records, indent=1, sort_keys=True))
        partial.replace(path)


def write_result(path: str | Path, kind: str, result: dict[str, Any], command: list[str] | None = None) -> None:
    """Write a benchmark's ``result`` as JSON to ``path`` with ``kind`` (what produced it, which
    ``rlhf_pipeline.report`` renders by) and the :func:`provenance` of ``command``, at the commit of this
    package's checkout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = provenance(command, path=Path(__file__).resolve().parent)
    path.write_text(json.dumps({"kind": kind, **result, "provenance": record}, indent=2))
