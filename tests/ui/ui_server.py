"""The `ui` command served for browser tests: started on a free port, waited for, stopped with Ctrl-C (exit 0)."""
from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def open_panel(browser, url: str, tab: str, ready: str):
    """A fresh browser context (a new gradio session) on one tab of the app, once `ready` (a selector) shows.

    Args:
        browser: Playwright's browser.
        url (str): the app.
        tab (str): the tab's title ("Train", "Tools", ...).
        ready (str): a selector that exists once the panel is built.

    Yields:
        Page: the page.
    """
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15000)
    try:
        page = context.new_page()
        page.goto(url)
        page.locator("#lt-tabs button", has_text=re.compile(rf"^\s*{re.escape(tab)}\s*$")).first.click()
        page.wait_for_selector(ready)
        yield page
    finally:
        context.close()


def choose(page, elem_id: str, option: str) -> None:
    """Pick a Dropdown option (gradio 3 marks options with data-value, gradio 4 with aria-label)."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"ul.options li[data-value='{option}'], ul.options li[aria-label='{option}']").first.click()
