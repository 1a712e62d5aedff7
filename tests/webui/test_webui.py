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


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_files_with_conv_load_with_every_key_matched(webui, dataset, algo):
    """LoHa and LoKr (incl. 3x3 convs): the WebUI's Lora extension reads every key and the LoRA changes the image."""
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_{algo}_{STAMP}"
    base = webui.txt2img("box, red")
    lines_before = len(webui.log_lines())
    status = webui.train(_config(dataset, name, network_module="lycoris.kohya", conv_dim=2, conv_alpha=1,
                                 network_args=[f"algo={algo}", "factor=4"]))
    assert status["state"] == "finished", status["message"]
    diff = abs(webui.txt2img(f"box, red <lora:{name}:1>") - base).mean()
    print(f"{algo}: mean |pixel diff| with the LoRA {diff:.2f}")
    assert diff > 1.0
    new_lines = webui.log_lines()[lines_before:]
    assert unmatched_lines(new_lines) == []


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


# --- LoRA tools through their routes: the files they make load in the WebUI --------------------------------------

@pytest.fixture(scope="module")
def tool_loras(webui, tiny):
    """Two random LoRAs (ranks 4 and 2) on the tiny SD1 model, in the WebUI's Lora folder (removed with the rest)."""
    from lora_trainer.testing.lora_files import random_lora, tiny_targets

    targets = tiny_targets(tiny["sd1"])
    folder = Path(A1111_DIR) / "models" / "Lora"
    names = [f"lt_test_sd1_{STAMP}_ta", f"lt_test_sd1_{STAMP}_tb"]
    for seed, (name, dim) in enumerate(zip(names, (4, 2))):
        random_lora(targets, folder / f"{name}.safetensors", dim=dim, alpha=dim, seed=seed + 1)
    return names


def test_merged_and_block_weighted_loras_from_the_api_load_and_render(webui, tool_loras):
    webui.use_checkpoint(webui.titles["sd1"])
    a, b = tool_loras
    base = webui.txt2img("box, red")
    lines_before = len(webui.log_lines())
    preview = webui.tool("merge", {"loras": {f"{a}.safetensors": 0.7, f"{b}.safetensors": -0.4}, "rank": 2})
    assert preview["written"] is None and preview["ranks"] == [2]
    merged = webui.tool("merge", {"loras": {f"{a}.safetensors": 0.7, f"{b}.safetensors": -0.4},
                                  "out": f"{a}_merged.safetensors"})
    weighted = webui.tool("lbw", {"file": f"{a}.safetensors", "weights": "OUTD", "out": f"{a}_outd.safetensors"})
    assert merged["mode"] == "exact" and merged["retained_overall"] > 0.999999
    assert Path(weighted["written"]).name == f"{a}_outd.safetensors"
    assert Path(merged["written"]).parent == Path(A1111_DIR) / "models" / "Lora"
    assert webui.loaded_weights_lines(lines_before) == [], "the tools must not reload or unload the model"
    assert {f"{a}_merged", f"{a}_outd"} <= webui.lora_names(), "the new files are listed without a manual refresh"
    assert abs(webui.txt2img("box, red") - base).mean() == 0, "the loaded model must be untouched by the tools"
    images = {name: webui.txt2img(f"box, red <lora:{name}:1>") for name in (a, f"{a}_merged", f"{a}_outd")}
    diffs = {name: abs(image - base).mean() for name, image in images.items()}
    print(f"tools: mean |pixel diff| from the base image {diffs}")
    assert all(diff > 1.0 for diff in diffs.values()), diffs
    assert abs(images[f"{a}_outd"] - images[a]).mean() > 0.5, "OUTD must change what the LoRA does"
    new_lines = webui.log_lines()[lines_before:]
    assert unmatched_lines(new_lines) == []
    assert not [line for line in new_lines if "Error" in line and "lora" in line.lower()], new_lines[-20:]


def test_a_baked_checkpoint_loads_and_renders_as_the_lora_does(webui, tiny, tool_loras):
    webui.use_checkpoint(webui.titles["sd1"])
    a = tool_loras[0]
    base = webui.txt2img("box, red")
    with_lora = webui.txt2img(f"box, red <lora:{a}:1>")
    lines_before = len(webui.log_lines())
    baked_name = f"lt_test_sd1_{STAMP}_baked.safetensors"
    baked_path = Path(A1111_DIR) / "models" / "Stable-diffusion" / baked_name
    try:
        report = webui.tool("bake", {"checkpoint": webui.titles["sd1"], "loras": {f"{a}.safetensors": 1.0},
                                     "out": baked_name})
        assert Path(report["written"]) == baked_path and report["weights_changed"] > 0
        assert webui.loaded_weights_lines(lines_before) == [], "baking must not reload or unload the model"
        assert abs(webui.txt2img("box, red") - base).mean() == 0
        webui.installation.install_yaml(tiny["sd1"], baked_name)
        webui.call("/sdapi/v1/refresh-checkpoints", {})
        webui.use_checkpoint(baked_name)
        baked = webui.txt2img("box, red")
        print(f"bake: mean |pixel diff| baked vs base {abs(baked - base).mean():.2f}, baked vs base + "
              f"<lora:1> {abs(baked - with_lora).mean():.3f}")
        assert abs(baked - base).mean() > 1.0
        assert abs(baked - with_lora).mean() < 0.5, "the baked checkpoint must render as the LoRA at 1 does"
    finally:
        webui.use_checkpoint(webui.titles["sd1"])
        baked_path.unlink(missing_ok=True)
        webui.call("/sdapi/v1/refresh-checkpoints", {})
