"""Pause -> generate -> resume in a real AUTOMATIC1111 WebUI (see webui_harness.py): a paused run lets go of the
WebUI's queue, so a txt2img (plain and with a `<lora:...>` the Lora extension merges into the weights) and our grid
route answer while the run waits; resumed, it finishes with the losses of a run that never paused, and the model is
the base model bit for bit afterwards. Skipped when A1111_DIR is not set."""
from __future__ import annotations

import os
import time

import pytest
from webui_harness import STAMP

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set: these tests need a real AUTOMATIC1111 WebUI "
                                             "checkout (and A1111_PYTHON, its venv's python)"),
]
TRAIN = "/lora_trainer/v1/train"
STEPS = 40


def _config(dataset, name: str) -> dict:
    return {"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name, "max_train_steps": STEPS,
            "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4, "cache_latents": True, "seed": 3,
            "save_precision": "float", "network_dropout": 0.1}


def _until(webui, done, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = webui.call(f"{TRAIN}/status")
        if done(status) or status["state"] in ("finished", "stopped", "failed"):
            return status
        time.sleep(0.05)
    raise TimeoutError(status)


def test_txt2img_and_a_grid_run_during_a_pause_then_training_resumes(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    base = webui.txt2img("box, red")
    plain_name = f"lt_test_sd1_{STAMP}_nopause"
    plain = webui.train(_config(dataset, plain_name))
    assert plain["state"] == "finished", plain["message"]

    webui.call(f"{TRAIN}/start", {"config": _config(dataset, f"lt_test_sd1_{STAMP}_paused")})
    _until(webui, lambda s: s["step"] >= 3)
    assert webui.call(f"{TRAIN}/pause", {})["pause_requested"] is True
    paused = _until(webui, lambda s: s["state"] == "paused")
    assert paused["state"] == "paused", paused["message"]
    assert 3 <= paused["step"] < STEPS

    grid = webui.call("/lora_trainer/v1/test/grid", {"prompt": "box, red", "strengths": [0, 1], "seeds": [1],
                                                     "snapshots": ["in memory"], "steps": 4, "width": 64,
                                                     "height": 64})
    during = webui.txt2img("box, red")                        # the queue is free: it answers while paused
    with_lora = webui.txt2img(f"box, red <lora:{plain_name}:1>")  # merged into the weights by the Lora extension
    lines_before = len(webui.log_lines())
    still = webui.call(f"{TRAIN}/status")
    assert still["state"] == "paused" and still["step"] == paused["step"]
    assert abs(during - base).mean() == 0  # the paused run's network is off the model
    assert abs(with_lora - base).mean() > 1.0
    assert len(grid["cells"]) == 2 and {c["snapshot"] for c in grid["cells"]} == {"in memory"}

    assert webui.call(f"{TRAIN}/resume", {})["resume_requested"] is True
    final = _until(webui, lambda s: False)
    assert final["state"] == "finished", final["message"]
    losses, expected = [loss for _, loss in final["losses"]], [loss for _, loss in plain["losses"]]
    print(f"paused at step {paused['step']}; largest loss difference to the run without a pause: "
          f"{max(abs(a - b) for a, b in zip(losses, expected)):.3g}")
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-7)
    restored = [line for line in webui.log_lines()[lines_before:] if "handshake 1: restored" in line]
    assert restored and " 0 layers" not in restored[0]  # resuming took the merged <lora:...> out first
    assert abs(webui.txt2img("box, red") - base).mean() == 0  # the merged LoRA was taken out, nothing left over


def test_the_webui_interrupt_stops_a_paused_run_and_saves(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_sd1_{STAMP}_interrupted"
    webui.call(f"{TRAIN}/start", {"config": dict(_config(dataset, name), max_train_steps=400)})
    _until(webui, lambda s: s["step"] >= 1)
    webui.call(f"{TRAIN}/pause", {})
    paused = _until(webui, lambda s: s["state"] == "paused")
    assert paused["state"] == "paused", paused["message"]
    webui.txt2img("box")                      # a generation during the pause; its job ends, the paused run shows again
    time.sleep(1.0)
    assert webui.call(f"{TRAIN}/status")["state"] == "paused"
    webui.call("/sdapi/v1/interrupt", {})
    final = _until(webui, lambda s: False, timeout=120)
    assert final["state"] == "stopped", final["message"]
    assert final["step"] == paused["step"] and final["lora_path"].endswith(f"{name}.safetensors")
