"""Headless Chromium for the tests that look at a page as a person sees it (MLflow, kedro-viz, the docs site)."""

from __future__ import annotations

import shutil
import subprocess
import time

from rlhf_pipeline.training.engine import child_environment, free_port

__all__ = ["browser", "free_port", "rendered", "serve"]


def browser() -> str | None:
    """The path of a Chromium (or Chrome) executable, or ``None`` where none is installed."""
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran, as headless Chromium renders it."""
    process = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                              "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return process.stdout


def serve(command: list[str], cwd, url: str) -> subprocess.Popen:
    """Start a local server and wait until ``url`` answers."""
    import urllib.request

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=child_environment())
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise TimeoutError(f"{' '.join(command)} did not answer at {url}")


