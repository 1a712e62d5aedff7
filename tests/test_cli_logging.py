"""The command line's log as a user reads it: our INFO lines, no library chatter unless --verbose.

Real subprocesses: `ui` serves the app and answers queued events (gradio 3 relays each one through httpx, one
INFO line per event), `train` loads the tiny model (diffusers imports bitsandbytes, which warns about an optional
CPU kernel, and diffusers warns about an empty list of float32 modules).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lora_trainer.testing.datasets import write_square_dataset

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NOISE = ("gemm_4bit_forward", "should be kept in float32: []")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ui exited early: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def _queued_event(port: int, fn_index: int, data: list) -> None:
    """One event through gradio 3's queue (what a browser click does), on the synchronous websocket client (a test
    that ran before may leave an event loop running in this thread)."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/queue/join", open_timeout=30, close_timeout=5) as ws:
        while True:
            message = json.loads(ws.recv(timeout=30))
            if message["msg"] == "send_hash":
                ws.send(json.dumps({"fn_index": fn_index, "session_hash": "logtest"}))
            elif message["msg"] == "send_data":
                ws.send(json.dumps({"data": data, "event_data": None, "fn_index": fn_index,
                                    "session_hash": "logtest"}))
            elif message["msg"] == "process_completed":
                assert message.get("success"), message
                return


def _folder_copy_event(config: dict) -> int:
    """The fn_index of the event that copies the Dataset panel's folder into the Train panel's."""
    ids = {c.get("props", {}).get("elem_id"): c["id"] for c in config["components"]}
    for index, dep in enumerate(config["dependencies"]):
        if dep["inputs"] == [ids["lt-ds-folder"]] and dep["outputs"] == [ids["lt-tr-folder"]]:
            return index
    raise AssertionError("no folder-sharing event in the app's config")


def _run_ui(tmp_path: Path, verbose: bool) -> str:
    pytest.importorskip("gradio")
    pytest.importorskip("websockets.sync.client")
    port = _free_port()
    command = [sys.executable, "-m", "lora_trainer", *(["--verbose"] if verbose else []), "ui", "--port", str(port),
               "--lora-dir", str(tmp_path / "out")]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/config", process)
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
        fn_index = _folder_copy_event(config)
        for value in ("a", "b"):
            _queued_event(port, fn_index, [value])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    return output


def test_ui_log_has_no_request_lines_by_default(tmp_path):
    output = _run_ui(tmp_path, verbose=False)
    assert "http://127.0.0.1" in output  # our own line: where to point the browser
    assert "HTTP Request" not in output and "httpx" not in output, output
    assert not any(noise in output for noise in LIBRARY_NOISE), output


def test_ui_log_shows_request_lines_with_verbose(tmp_path):
    output = _run_ui(tmp_path, verbose=True)
    assert "HTTP Request: POST" in output, output  # one per queued event, from httpx


def test_train_log_keeps_our_lines_and_drops_library_noise(tiny_sd1, tmp_path):
    dataset = write_square_dataset(tmp_path / "data", folder="5_mychar", caption="mychar, red square")
    config = tmp_path / "run.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_sd1.checkpoint}"\n'
        f'diffusers_config_dir = "{tiny_sd1.config_dir}"\ntokenizer_dir = "{tiny_sd1.tokenizer_dir}"\n'
        f'train_data_dir = "{dataset}"\noutput_dir = "{tmp_path / "out"}"\n'
        'resolution = "64,64"\nnetwork_dim = 2\nmax_train_steps = 1\ncache_latents = true\nseed = 1\n',
        encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(config)], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "INFO lora_trainer.models.loading: loaded sd1 checkpoint" in output
    assert "INFO lora_trainer.train.preflight: training plan" in output
    assert "INFO lora_trainer.cli.train: CPU training on 1 thread (OMP_NUM_THREADS)" in output
    assert not any(noise in output for noise in LIBRARY_NOISE), output
