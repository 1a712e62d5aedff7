"""The extension in a real Stable Diffusion WebUI Forge on the CPU (see host_harness.py): the tab and routes load,
training through our API runs in place on Forge's loaded full-size SD1 model, the LoRA loads in Forge with every key
matched and changes the image, the model is bit-identical afterwards, a txt2img sent during training waits, and a
test grid renders the LoRA in memory through Forge's own processing; with LORA_TRAINER_SD2=1 / LORA_TRAINER_SDXL=1
also training in place on a full-size SD2 / SDXL model. Skipped when FORGE_DIR is not set."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from host_harness import STAMP, HostSetup, check_xyz_strength_cells, extension_errors, timed_train

FORGE = HostSetup.from_env("forge")

pytestmark = [pytest.mark.webui, pytest.mark.skipif(FORGE.skip_reason is not None, reason=str(FORGE.skip_reason))]

PROMPT = "box, red"
GRID = "/lora_trainer/v1/test/grid"
SETTINGS = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}


def _config(dataset, name, **extra):
    config = {"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name, "max_train_steps": 6,
              "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4, "cache_latents": True, "seed": 1,
              "save_precision": "float", "gradient_checkpointing": True}
    config.update(extra)
    return config


def test_the_tab_settings_and_routes_load_without_errors(forge):
    assert forge.call("/lora_trainer/v1/train/status")["state"] == "idle"
    config = forge.call("/config")
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "LoRA Trainer" in labels, "the tab should be in Forge's UI"
    assert "Folder for trained LoRAs (empty: the WebUI's Lora folder)" in labels, "our settings section"
    assert extension_errors(forge.log_lines()) == []
    assert any("host: forge" in line for line in forge.log_lines())


def test_train_in_place_then_the_lora_loads_with_every_key_and_changes_the_image(forge, dataset):
    name = f"lt_test_sd1_{STAMP}"
    base = forge.txt2img(PROMPT)
    lines_before = len(forge.log_lines())
    status = forge.train(_config(dataset, name))
    assert status["state"] == "finished", status["message"]
    assert status["step"] == 6 and Path(status["lora_path"]).parent == forge.lora_dir
    assert status["compat"]["ok"] and status["compat"]["checked"] > 0, status["compat"]
    run_lines = forge.log_lines()[lines_before:]
    assert any("compatibility self-test: all" in line for line in run_lines)
    converted = [line for line in run_lines if "made ordinary in place" in line]
    assert converted and not re.search(r"handshake 3: 0 inference", converted[0]), converted
    assert name in forge.lora_names()

    with_lora = forge.txt2img(f"{PROMPT} <lora:{name}:1>")
    again = forge.txt2img(PROMPT)
    new_lines = forge.log_lines()[lines_before:]  # the txt2img waited for the run to give the model back
    assert any("weights bit-identical after the run" in line for line in new_lines)
    loaded = [line for line in new_lines if "[LORA] Loaded" in line and name in line]
    print(f"mean |pixel diff| with the LoRA {abs(with_lora - base).mean():.2f}; {loaded}")
    assert loaded and all("(skipped 0 keys)" in line for line in loaded), new_lines[-40:]
    assert not any("unmatched keys" in line or "Mismatch" in line for line in new_lines)
    assert abs(with_lora - base).mean() > 1.0
    assert abs(again - base).mean() == 0, "the model must be exactly as before training (same seed, same image)"
    assert extension_errors(new_lines) == []


def test_a_txt2img_sent_during_training_waits_then_runs(forge, dataset):
    name = f"lt_test_sd1_{STAMP}_i"
    forge.call("/lora_trainer/v1/train/start", {"config": _config(dataset, name, max_train_steps=400,
                                                                   network_train_unet_only=True)})
    while forge.call("/lora_trainer/v1/train/status")["step"] < 2:
        time.sleep(0.2)
    images = []
    generation = threading.Thread(target=lambda: images.append(forge.txt2img(PROMPT)))
    generation.start()
    step = forge.call("/lora_trainer/v1/train/status")["step"]
    while forge.call("/lora_trainer/v1/train/status")["step"] < step + 2:
        time.sleep(0.2)
    assert generation.is_alive() and not images, "the txt2img must wait while training holds the model"
    state = forge.call("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert state["job"] == f"Train LoRA {name}" and state["sampling_steps"] == 400
    forge.call("/sdapi/v1/interrupt", {})  # Forge's Interrupt button
    generation.join(600)
    status = forge.call("/lora_trainer/v1/train/status")
    assert status["state"] == "stopped" and Path(status["lora_path"]).is_file(), status
    assert 2 <= status["step"] < 400 and len(images) == 1 and images[0].shape == (64, 64, 3)


def test_a_merged_prompt_lora_is_taken_out_for_training_and_a_rewritten_file_is_read_again(forge, dataset):
    """Forge merges prompt LoRAs into the weights and caches files by name: training restores the weights first,
    the next generation merges again, and a file written again under the same name is not served from the cache."""
    name = f"lt_test_sd1_{STAMP}_m"
    assert forge.train(_config(dataset, name, max_train_steps=2, network_train_unet_only=True))["state"] == "finished"
    first = forge.txt2img(f"{PROMPT} <lora:{name}:1>")  # merged into the weights, kept there
    lines_before = len(forge.log_lines())
    status = forge.train(_config(dataset, name, max_train_steps=2, network_train_unet_only=True, seed=7,
                                 learning_rate=3e-2))
    assert status["state"] == "finished", status["message"]
    restored = [line for line in forge.log_lines()[lines_before:] if "handshake 1: restored" in line]
    assert restored and "restored 0 weights" not in restored[0], restored
    second = forge.txt2img(f"{PROMPT} <lora:{name}:1>")
    assert abs(second - first).mean() > 0.5, "the rewritten file must be merged, not the cached first one"
    plain = forge.txt2img(PROMPT)
    assert any("weights bit-identical after the run" in line for line in forge.log_lines()[lines_before:])
    assert abs(plain - second).mean() > 0.5


def test_a_grid_renders_the_in_memory_lora_through_forge(forge, dataset):
    """Strength 0 is Forge's plain txt2img bit for bit, strength 1 is close to the saved file merged by Forge, the
    model's weights are the same afterwards (sha256 before and after the grid), and Forge's X/Y/Z plot with our
    strength axis renders the same cells."""
    from host_harness import decode_png

    name = f"lt_test_sd1_{STAMP}_g"
    assert forge.train(_config(dataset, name))["state"] == "finished"
    base = forge.generate({"prompt": PROMPT, "seed": 1, **SETTINGS})[1][0]
    lines_before = len(forge.log_lines())
    answer = forge.call(GRID, {"prompt": PROMPT, "strengths": [0, 1], "seeds": [1], "snapshots": ["in memory"],
                               **SETTINGS})
    cells = {c["strength"]: decode_png(c["image"]) for c in answer["cells"]}
    Path(answer["path"]).unlink()
    grid_lines = forge.log_lines()[lines_before:]
    assert any("grid: the model is bit-identical to before the grid (sha256" in line for line in grid_lines)
    assert extension_errors(grid_lines) == []
    plain_after = forge.generate({"prompt": PROMPT, "seed": 1, **SETTINGS})[1][0]
    from_file = forge.generate({"prompt": f"{PROMPT} <lora:{name}:1>", "seed": 1, **SETTINGS})[1][0]
    effect, gap = abs(cells[1.0] - base).mean(), abs(cells[1.0] - from_file).mean()
    print(f"grid strength 1 vs plain {effect:.2f}, vs <lora:{name}:1> from the file {gap:.2f}")
    assert abs(cells[0.0] - base).max() == 0, "strength 0 must be Forge's plain txt2img"
    assert abs(plain_after - base).max() == 0, "the model must be as before the grid"
    assert effect > 1.0 and gap < effect / 4
    check_xyz_strength_cells(forge, {"prompt": PROMPT, "seed": 1, **SETTINGS}, cells[0.0], cells[1.0], base)


def test_sd2_and_sdxl_train_in_place_then_the_lora_loads_with_every_key_and_changes_the_image(forge_other, dataset):
    """The SD1 round trip on a full-size SD2 (with its OpenCLIP-H text encoder) or SDXL model (UNet only, for
    memory), 2 steps at 64 px."""
    arch, host = forge_other
    name = f"lt_test_{arch}_lora_{STAMP}"
    base = host.txt2img(PROMPT)  # loads the model
    lines_before = len(host.log_lines())
    status = timed_train(host, _config(dataset, name, max_train_steps=2, network_train_unet_only=arch == "sdxl"),
                         f"Forge {arch}")
    assert status["state"] == "finished", status["message"]
    assert status["step"] == 2 and Path(status["lora_path"]).parent == host.lora_dir
    assert status["compat"]["ok"] and status["compat"]["checked"] > 0, status["compat"]
    with_lora = host.txt2img(f"{PROMPT} <lora:{name}:1>")
    again = host.txt2img(PROMPT)
    new_lines = host.log_lines()[lines_before:]
    assert any("weights bit-identical after the run" in line for line in new_lines)
    loaded = [line for line in new_lines if "[LORA] Loaded" in line and name in line]
    print(f"{arch}: mean |pixel diff| with the LoRA {abs(with_lora - base).mean():.2f}; {loaded}")
    assert loaded and all("(skipped 0 keys)" in line for line in loaded), new_lines[-40:]
    assert not any("with unmatched keys" in line for line in new_lines)
    parts = {part for line in loaded for part in ("UNet", "CLIP") if f"-{part} with" in line}
    assert parts == ({"UNet"} if arch == "sdxl" else {"UNet", "CLIP"}), loaded
    assert abs(with_lora - base).mean() > 1.0
    assert abs(again - base).mean() == 0, "the model must be exactly as before training (same seed, same image)"
    assert extension_errors(new_lines) == []
