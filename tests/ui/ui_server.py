"""The `ui` command served for browser tests: started on a free port, waited for, stopped with Ctrl-C (exit 0)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interruptible() -> None:
    """Let Ctrl-C reach the server even when the test runs in a background job (whose SIGINT is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def serve_ui(args: list[str], log: Path):
    """Run `python -m lora_trainer ui --port P ARGS --device cpu` (one torch thread: the CI machine is small).

    Args:
        args (list[str]): the command's other options (`--lora-dir`, `--models-dir`, ...).
        log (Path): the server's output, shown when it fails.

    Yields:
        str: the app's URL, once it answers.
    """
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), *args, "--device",
                                 "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_interruptible)  # noqa: PLW1509 (one signal call)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the ui command did not serve {url}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=20) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def fill(page, elem_id: str, text) -> None:
    """Type into a panel's text or number field by its element id."""
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input[type=number], "
                 f"#{elem_id} input:not([type])").first.fill(str(text))
