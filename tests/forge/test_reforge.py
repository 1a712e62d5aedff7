"""The extension in a real stable-diffusion-webui-reForge on the CPU (the shared parts: host_harness.py): the tab and
routes load, training through our API runs in place on reForge's loaded full-size SD1 model, the LoRA loads in
reForge with every key and changes the image, the model is bit-identical afterwards, a txt2img sent during training
waits then runs, and a test grid renders the LoRA in memory through reForge's own processing.
Skipped when REFORGE_DIR is not set (REFORGE_PYTHON: its venv's python)."""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path

import pytest
from host_harness import FORGE_CPU_FLAGS, OTHER_ARCHITECTURES, STAMP, HostSetup, Installation, \
    check_xyz_strength_cells, checkpoint_selected, extension_errors, random_checkpoint, start_host, timed_train
from webui_harness import install_requirements

REFORGE = HostSetup.from_env("reforge", flags=[*FORGE_CPU_FLAGS, "--no-download-sd-model"])
pytestmark = [pytest.mark.webui,
              pytest.mark.skipif(REFORGE.skip_reason is not None, reason=str(REFORGE.skip_reason))]

PROMPT = "box, red"
NAME = f"lt_test_rf_{STAMP}"
GRID = "/lora_trainer/v1/test/grid"
SETTINGS = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}
LOADED = re.compile(r"\[LORA\] Loaded (\S+) for \w+ with (\d+) keys")


def _config(dataset, name, **extra):
    config = {"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name, "max_train_steps": 6,
              "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4, "cache_latents": True, "seed": 1,
              "save_precision": "float", "gradient_checkpointing": True}
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def reforge(tmp_path_factory):
    checkpoint = random_checkpoint(tmp_path_factory.getbasetemp() / "random_models")
    install = Installation(REFORGE.dir)
    target = REFORGE.dir / "models" / "Stable-diffusion" / f"{NAME}.safetensors"
    server = None
    try:
        install.install_extension()
        install.link(checkpoint, target)
        print(install_requirements(REFORGE.python))  # what reForge's launch does without --skip-prepare-environment
        setup = dataclasses.replace(REFORGE, flags=(*REFORGE.flags, "--ckpt", str(target)))
        server = start_host(setup, tmp_path_factory.mktemp("reforge_log") / "reforge.log")
        server.lora_dir = REFORGE.dir / "models" / "Lora"
        yield server
    finally:
        if server is not None:
            server.stop()
        for path in (REFORGE.dir / "models" / "Lora").glob(f"{NAME}*"):
            path.unlink()
        install.remove()


@pytest.fixture(scope="module")
def trained(reforge, dataset):
    """One finished run (UNet + text encoder), with the images and log lines around it."""
    base = reforge.txt2img(PROMPT)
    lines_before = len(reforge.log_lines())
    status = timed_train(reforge, _config(dataset, NAME), "reForge")
    again = reforge.txt2img(PROMPT)  # waits until the job has given the model back
    return {"status": status, "base": base, "again": again, "lines": reforge.log_lines()[lines_before:]}


def test_the_tab_settings_and_routes_load_without_errors(reforge):
    assert reforge.call("/lora_trainer/v1/train/status")["state"] == "idle"
    labels = {c.get("props", {}).get("label") for c in reforge.call("/config")["components"]}
    assert "LoRA Trainer" in labels, "the tab should be in reForge's UI"
    # reForge's /sdapi/v1/options lists only options set in its config.json, so the settings are looked for in the UI
    assert "Keep the trained LoRA's weights on the CPU while it is not applied" in labels
    assert any("host: reforge" in line for line in reforge.log_lines())
    assert extension_errors(reforge.log_lines()) == []


def test_training_runs_in_place_on_the_loaded_model(trained, reforge):
    status, lines = trained["status"], trained["lines"]
    assert status["state"] == "finished", status["message"]
    assert status["step"] == 6 and Path(status["lora_path"]).parent == reforge.lora_dir
    assert any("compatibility self-test: all" in line for line in lines)
    assert any("patchers fully loaded" in line for line in lines)
    assert any("made ordinary in place" in line for line in lines)
    assert any("weights bit-identical after the run" in line for line in lines)
    assert abs(trained["again"] - trained["base"]).max() == 0, "the model must be exactly as before training"
    created = next(line for line in lines if "created lora network" in line)
    assert "192 UNet and 72 text-encoder modules" in created, created
    assert not any("Loading weights" in line for line in lines), "the checkpoint must not be loaded again"
    assert extension_errors(lines) == []


def test_the_lora_loads_with_every_key_changes_the_image_and_the_model_is_as_before(trained, reforge):
    from safetensors import safe_open

    with safe_open(trained["status"]["lora_path"], framework="pt") as handle:
        modules = {key.split(".", 1)[0] for key in handle.keys()}
    lines_before = len(reforge.log_lines())
    with_lora = reforge.txt2img(f"{PROMPT} <lora:{NAME}:1>")
    again = reforge.txt2img(PROMPT)
    new_lines = reforge.log_lines()[lines_before:]
    loaded = [LOADED.search(line) for line in new_lines if NAME in line and "[LORA] Loaded" in line]
    assert loaded and all(int(m.group(2)) == len(modules) for m in loaded if m), new_lines[-20:]
    assert not any("lora key not loaded" in line or "NOT LOADED" in line for line in new_lines)
    print(f"mean |pixel diff| with the LoRA {abs(with_lora - trained['base']).mean():.2f}")
    assert abs(with_lora - trained["base"]).mean() > 1.0
    assert abs(again - trained["base"]).max() == 0, "the model must be exactly as before training"


def test_a_grid_renders_the_in_memory_lora_through_reforge(trained, reforge):
    base = reforge.generate({"prompt": PROMPT, "seed": 1, **SETTINGS})[1][0]
    lines_before = len(reforge.log_lines())
    answer = reforge.call(GRID, {"prompt": PROMPT, "strengths": [0, 1], "seeds": [1], "snapshots": ["in memory"],
                                 **SETTINGS})
    cells = {(c["strength"], c["snapshot"]): c for c in answer["cells"]}
    from host_harness import decode_png

    images = {strength: decode_png(cells[(strength, "in memory")]["image"]) for strength in (0.0, 1.0)}
    assert abs(images[0.0] - base).max() == 0
    assert abs(images[1.0] - base).mean() > 1.0
    Path(answer["path"]).unlink()
    assert any("grid: the model is bit-identical to before the grid" in line
               for line in reforge.log_lines()[lines_before:])
    assert abs(reforge.generate({"prompt": PROMPT, "seed": 1, **SETTINGS})[1][0] - base).max() == 0
    check_xyz_strength_cells(reforge, {"prompt": PROMPT, "seed": 1, **SETTINGS}, images[0.0], images[1.0], base)


def test_a_txt2img_sent_during_training_waits_then_runs(trained, reforge, dataset):
    reforge.txt2img(f"{PROMPT} <lora:{NAME}:1>")  # reForge merges it into the weights and keeps it there
    name = f"{NAME}_i"
    lines_before = len(reforge.log_lines())
    reforge.call("/lora_trainer/v1/train/start", {"config": _config(dataset, name, max_train_steps=400,
                                                                     network_train_unet_only=True)})
    while reforge.call("/lora_trainer/v1/train/status")["step"] < 2:
        time.sleep(0.2)
    images = []
    generation = threading.Thread(target=lambda: images.append(reforge.txt2img(PROMPT)))
    generation.start()
    step = reforge.call("/lora_trainer/v1/train/status")["step"]
    while reforge.call("/lora_trainer/v1/train/status")["step"] < step + 2:
        time.sleep(0.2)
    assert generation.is_alive() and not images, "the txt2img must wait while training holds the model"
    state = reforge.call("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert state["job"] == f"Train LoRA {name}" and state["sampling_steps"] == 400
    reforge.call("/sdapi/v1/interrupt", {})
    generation.join(600)
    status = reforge.call("/lora_trainer/v1/train/status")
    assert status["state"] == "stopped" and Path(status["lora_path"]).is_file(), status
    assert 2 <= status["step"] < 400 and len(images) == 1
    assert abs(images[0] - trained["base"]).max() == 0, "generation after the run sees the model as before"
    taken_off = [line for line in reforge.log_lines()[lines_before:] if "had a prompt LoRA taken off" in line]
    assert taken_off and not re.search(r" 0 UNet weights had", taken_off[0]), taken_off


def test_a_paused_run_lets_reforge_generate_then_resumes_and_leaves_the_model_as_before(trained, reforge, dataset):
    name = f"{NAME}_p"
    reforge.call("/lora_trainer/v1/train/start", {"config": _config(dataset, name, max_train_steps=8,
                                                                     network_train_unet_only=True)})
    while reforge.call("/lora_trainer/v1/train/status")["step"] < 2:
        time.sleep(0.2)
    assert reforge.call("/lora_trainer/v1/train/pause", {})["pause_requested"] is True
    while (paused := reforge.call("/lora_trainer/v1/train/status"))["state"] not in ("paused", "failed"):
        time.sleep(0.2)
    assert paused["state"] == "paused", paused["message"]
    during = reforge.txt2img(PROMPT)  # answers while paused: the queue and the main thread are free
    with_lora = reforge.txt2img(f"{PROMPT} <lora:{NAME}:1>")  # reForge merges it into the weights
    lines_before = len(reforge.log_lines())
    assert abs(during - trained["base"]).max() == 0 and abs(with_lora - trained["base"]).mean() > 1.0
    assert reforge.call("/lora_trainer/v1/train/resume", {})["resume_requested"] is True
    while (final := reforge.call("/lora_trainer/v1/train/status"))["state"] not in ("finished", "stopped", "failed"):
        time.sleep(0.2)
    assert final["state"] == "finished" and final["step"] == 8, final["message"]
    assert abs(reforge.txt2img(PROMPT) - trained["base"]).max() == 0, "nothing of the pause's LoRA is left"
    resumed = [line for line in reforge.log_lines()[lines_before:] if "had a prompt LoRA taken off" in line]
    assert resumed and not re.search(r" 0 UNet weights had", resumed[0]), resumed
    assert extension_errors(reforge.log_lines()[lines_before:]) == []


@pytest.fixture(scope="module", params=sorted(OTHER_ARCHITECTURES))
def reforge_other(request, reforge, tmp_path_factory):
    """(arch, reForge) with a random SD2 or SDXL checkpoint loaded, when asked for; SD1 again after."""
    with checkpoint_selected(reforge, REFORGE, request.param, tmp_path_factory.getbasetemp() / "random_models",
                             f"{NAME}_{request.param}", f"{NAME}.safetensors") as host:
        yield request.param, host


def test_sd2_and_sdxl_training_in_place_then_the_lora_loads_with_every_key_and_changes_the_image(reforge_other,
                                                                                                dataset):
    """The SD1 round trip on a full-size SD2 (with its OpenCLIP-H text encoder) or SDXL model (UNet only, for
    memory), 2 steps at 64 px."""
    from safetensors import safe_open

    arch, host = reforge_other
    name = f"{NAME}_{arch}_lora"
    base = host.txt2img(PROMPT)
    lines_before = len(host.log_lines())
    status = timed_train(host, _config(dataset, name, max_train_steps=2, network_train_unet_only=arch == "sdxl"),
                         f"reForge {arch}")
    assert status["state"] == "finished" and status["step"] == 2, status["message"]
    with safe_open(status["lora_path"], framework="pt") as handle:
        modules = {key.split(".", 1)[0] for key in handle.keys()}
    assert any(m.startswith("lora_te") for m in modules) is (arch != "sdxl")
    with_lora = host.txt2img(f"{PROMPT} <lora:{name}:1>")
    again = host.txt2img(PROMPT)
    new_lines = host.log_lines()[lines_before:]
    assert any("weights bit-identical after the run" in line for line in new_lines)
    loaded = [LOADED.search(line) for line in new_lines if name in line and "[LORA] Loaded" in line]
    assert loaded and all(int(m.group(2)) == len(modules) for m in loaded if m), new_lines[-20:]
    assert not any("lora key not loaded" in line or "NOT LOADED" in line for line in new_lines)
    print(f"reForge {arch}: mean |pixel diff| with the LoRA {abs(with_lora - base).mean():.2f}")
    assert abs(with_lora - base).mean() > 1.0
    assert abs(again - base).max() == 0, "the model must be exactly as before training"
    assert extension_errors(new_lines) == []
