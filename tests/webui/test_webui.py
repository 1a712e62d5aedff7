"""The extension in a real AUTOMATIC1111 WebUI (see webui_harness.py for the environment): train through our API on the
loaded tiny SD1 and SDXL models, then generate with `<lora:NAME:1>`. Skipped when A1111_DIR is not set."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from webui_harness import STAMP, unmatched_lines, webui_python

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set: these tests need a real AUTOMATIC1111 WebUI "
                                             "checkout (and A1111_PYTHON, its venv's python)"),
]


def _config(dataset, name, **extra):
    config = {"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name, "max_train_steps": 8,
              "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4, "cache_latents": True, "seed": 1,
              "save_precision": "float", "gradient_checkpointing": True}
    config.update(extra)
    return config


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_train_through_the_api_then_generate_with_the_lora(webui, dataset, arch):
    webui.use_checkpoint(webui.titles[arch])
    name = f"lt_test_{arch}_{STAMP}"
    base = webui.txt2img("box, red")
    lines_before = len(webui.log_lines())
    status = webui.train(_config(dataset, name))
    assert status["state"] == "finished", status["message"]
    assert status["step"] == 8 and Path(status["lora_path"]).name == f"{name}.safetensors"
    assert status["compat"] == {"ok": True, "checked": status["compat"]["checked"]} and status["compat"]["checked"]
    listed = {entry["name"] for entry in webui.call("/sdapi/v1/loras")}
    assert name in listed, "refresh_loras should list the new file without a manual refresh"
    with_lora = webui.txt2img(f"box, red <lora:{name}:1>")
    again = webui.txt2img("box, red")
    diff = abs(with_lora - base).mean()
    print(f"{arch}: mean |pixel diff| with the LoRA {diff:.2f}, base repeat {abs(again - base).mean():.2f}")
    assert abs(again - base).mean() == 0, "the model must be exactly as before training (same seed, same image)"
    assert diff > 1.0
    new_lines = webui.log_lines()[lines_before:]
    assert unmatched_lines(new_lines) == []
    assert any("compatibility self-test: all" in line for line in new_lines)


def test_a_merged_lora_is_restored_before_training(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    first = f"lt_test_sd1_{STAMP}_m"
    assert webui.train(_config(dataset, first, max_train_steps=2, network_train_unet_only=True))["state"] == "finished"
    webui.txt2img(f"box <lora:{first}:1>")  # the Lora extension merges it into the weights and keeps it there
    lines_before = len(webui.log_lines())
    status = webui.train(_config(dataset, f"{first}2", max_train_steps=1, network_train_unet_only=True))
    assert status["state"] == "finished", status["message"]
    new_lines = webui.log_lines()[lines_before:]
    restored = [line for line in new_lines if "handshake 1: restored" in line]
    assert restored and " 0 layers" not in restored[0]
    assert any("handshake 1: UNet equals" in line for line in new_lines)


def test_bad_requests_are_400_with_a_message(webui):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        webui.call("/lora_trainer/v1/train/start", {"config": {"no_such_key": 1}})
    assert info.value.code == 400 and "no_such_key" in info.value.read().decode()


def test_every_lora_parameter_gets_a_gradient_through_checkpointed_sgm_blocks(tiny):
    script = Path(__file__).with_name("sgm_gradients.py")
    model = tiny["sdxl"]
    done = subprocess.run([webui_python(Path(A1111_DIR)), str(script), A1111_DIR, str(model.yaml),
                           str(model.checkpoint)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] > 0 and result["n_zero"] == 0, result
    assert result["checkpointed_blocks"] > 0 and result["identical"] and result["flags_restored"]


def test_interrupt_stops_and_saves_and_generation_waits_for_the_run(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_sd1_{STAMP}_i"
    webui.call("/lora_trainer/v1/train/start", {"config": _config(dataset, name, max_train_steps=400,
                                                                   network_train_unet_only=True)})
    while webui.call("/lora_trainer/v1/train/status")["step"] < 2:
        time.sleep(0.2)
    state = webui.call("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert state["job"] == f"Train LoRA {name}" and state["sampling_steps"] == 400 and state["sampling_step"] >= 1
    webui.call("/sdapi/v1/interrupt", {})  # the WebUI's Interrupt button
    webui.txt2img("box")  # queued behind the run: returns only once training has let go of the model
    status = webui.call("/lora_trainer/v1/train/status")
    assert status["state"] == "stopped" and status["lora_path"], status
    assert 2 <= status["step"] < 400
    assert Path(status["lora_path"]).is_file()
