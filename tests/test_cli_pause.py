"""`python -m lora_trainer train` in a real subprocess: SIGUSR1 pauses after the current step, SIGUSR1 again goes
on, Ctrl+C while paused stops and saves; a signal acts even when it lands while the main thread holds a lock."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_trainer.cli.signal_relay import SignalRelay
from lora_trainer.testing.datasets import write_square_dataset
from test_cli import write_config

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 exists on POSIX only")
ROOT = Path(__file__).resolve().parents[1]


def _lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read():
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, text: str, seen: list[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{''.join(seen)[-3000:]}")


def test_sigusr1_pauses_and_goes_on_and_ctrl_c_stops_while_paused(tiny_sd1, tmp_path):
    dataset = write_square_dataset(tmp_path / "data")
    config = write_config(tmp_path / "run.toml", tiny_sd1, dataset, tmp_path / "out",
                          "save_precision = \"float\"\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lora_trainer", "train", "--config", str(config), "--device", "cpu",
               "--set", "max_train_steps=5000", "--set", "train_batch_size=1"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines, seen = _lines(process), []
    try:
        _wait_for(lines, "created lora network", seen)  # logged by the run, after the signal handlers are set
        process.send_signal(signal.SIGUSR1)
        _wait_for(lines, f"`kill -USR1 {process.pid}` goes on", seen)  # the pause says how to go on
        process.send_signal(signal.SIGUSR1)
        _wait_for(lines, "going on from step", seen)
        process.send_signal(signal.SIGUSR1)
        _wait_for(lines, "paused after step", seen)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, "".join(seen)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + "".join(iter(lambda: lines.get_nowait() if not lines.empty() else "", ""))
    assert "stopped after" in output and (tmp_path / "out" / "cli_lora.safetensors").is_file()


def test_a_signal_landing_while_the_main_thread_holds_the_event_lock_still_acts():
    # Event.wait holds the Event's (non-reentrant) lock between its checks; a handler that set the Event itself
    # hung right here, as a pause poll did when `kill -USR1` landed inside it
    event = threading.Event()
    relay = SignalRelay()
    previous = signal.signal(signal.SIGUSR1, relay.handler(event.set))
    try:
        with event._cond:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)  # the handler runs in this thread, between bytecodes, while the lock is held
            assert not event.is_set()
        assert event.wait(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        relay.close()
