"""Testing a LoRA the moment it is trained, in a real AUTOMATIC1111 WebUI (see webui_harness.py): the grid route renders
through the WebUI's own txt2img on the LoRA still in memory (strength 0 is the base model bit for bit, nothing is
saved to the outputs folder, the model is bit-identical afterwards), a text-encoder LoRA changes the image (the
WebUI's conditioning cache is not stale), and our axes appear in the X/Y/Z plot script and render the same images.
Skipped when A1111_DIR is not set."""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
from webui_harness import STAMP, decode_png

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not A1111_DIR, reason="A1111_DIR is not set: these tests need a real AUTOMATIC1111 WebUI "
                                             "checkout (and A1111_PYTHON, its venv's python)"),
]
GRID = "/lora_trainer/v1/test/grid"
SETTINGS = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}
STRENGTH_AXIS, SNAPSHOT_AXIS = "LoRA Trainer: strength", "LoRA Trainer: snapshot"
WEIGHTS_AXIS = "LoRA Trainer: module weights"


def _train(webui, dataset, name: str, **extra) -> dict:
    config = {"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name, "max_train_steps": 8,
              "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4, "cache_latents": True, "seed": 1,
              "save_precision": "float"}
    status = webui.train(dict(config, **extra))
    assert status["state"] == "finished", status["message"]
    return status


def _plain(webui, prompt: str, seed: int):
    return webui.generate({"prompt": prompt, "seed": seed, **SETTINGS})[1][0]


def _cells(answer: dict) -> dict:
    return {(c["strength"], c["seed"], c["snapshot"]): decode_png(c["image"]) for c in answer["cells"]}


def _output_files() -> int:
    return sum(1 for path in (Path(A1111_DIR) / "outputs").rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def unet_and_te_lora(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_sd1_{STAMP}_grid"
    _train(webui, dataset, name)
    return name


def test_grid_renders_through_the_webui_on_the_in_memory_lora(webui, unet_and_te_lora):
    base = _plain(webui, "box, red", 1)
    files_before, lines_before = _output_files(), len(webui.log_lines())
    answer = webui.call(GRID, {"prompt": "box, red", "strengths": [0, 0.5, 1], "seeds": [1], **SETTINGS})
    cells = _cells(answer)
    snapshots = {c["snapshot"] for c in answer["cells"]}
    assert snapshots == {"in memory", unet_and_te_lora}
    assert abs(cells[(0.0, 1, "in memory")] - base).max() == 0, "strength 0 must be the base model bit for bit"
    assert abs(cells[(1.0, 1, "in memory")] - base).mean() > 1.0
    assert abs(cells[(0.5, 1, "in memory")] - base).mean() > 0 < abs(cells[(0.5, 1, "in memory")] - cells[(1.0, 1, "in memory")]).mean()
    with_file = _plain(webui, f"box, red <lora:{unet_and_te_lora}:1>", 1)  # the saved file through the Lora extension
    memory_vs_file = abs(cells[(1.0, 1, "in memory")] - with_file).mean()
    print(f"in memory vs <lora:...:1>: mean |diff| {memory_vs_file:.3f}; LoRA effect "
          f"{abs(with_file - base).mean():.2f}")
    assert memory_vs_file < 0.05 * abs(with_file - base).mean()
    assert abs(cells[(1.0, 1, unet_and_te_lora)] - cells[(1.0, 1, "in memory")]).mean() < 0.5  # float file
    assert Path(answer["path"]).is_file() and Path(answer["path"]).parent == Path(A1111_DIR) / "models" / "Lora"
    Path(answer["path"]).unlink()
    assert _output_files() == files_before, "the grid must not write to the WebUI's outputs folder"
    new_lines = webui.log_lines()[lines_before:]
    assert any("grid: the model is bit-identical to before the grid" in line for line in new_lines)
    assert abs(_plain(webui, "box, red", 1) - base).max() == 0, "the model must be as before the grid"


def test_a_merged_lora_in_the_prompt_is_taken_out_after_the_grid(webui, unet_and_te_lora):
    base = _plain(webui, "box", 2)
    answer = webui.call(GRID, {"prompt": f"box <lora:{unet_and_te_lora}:1>", "strengths": [0], "seeds": [2],
                               "snapshots": ["in memory"], **SETTINGS})
    with_file = _plain(webui, f"box <lora:{unet_and_te_lora}:1>", 2)
    assert abs(_cells(answer)[(0.0, 2, "in memory")] - with_file).max() == 0  # the Lora extension's own merge
    Path(answer["path"]).unlink()
    assert abs(_plain(webui, "box", 2) - base).max() == 0


def test_text_encoder_lora_changes_the_image(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_sd1_{STAMP}_te"
    _train(webui, dataset, name, network_train_text_encoder_only=True, learning_rate=5e-2)
    answer = webui.call(GRID, {"prompt": "box, red", "strengths": [0, 1], "seeds": [3], "snapshots": ["in memory"],
                               **SETTINGS})
    cells = _cells(answer)
    Path(answer["path"]).unlink()
    diff = abs(cells[(1.0, 3, "in memory")] - cells[(0.0, 3, "in memory")]).mean()
    print(f"text-encoder LoRA: mean |diff| strength 1 vs 0: {diff:.3f}")
    assert diff > 0.5, "a stale conditioning cache would give the strength-0 image again"
    # the same LoRA with its text-encoder modules at 0 ("UNet only") is the base model: the cache follows the weights
    answer = webui.call(GRID, {"prompt": "box, red", "strengths": [1], "seeds": [3], "snapshots": ["in memory"],
                               "weights": ["UNet + TE", "UNet only"], **SETTINGS})
    Path(answer["path"]).unlink()
    by_weights = {c["weights"]: decode_png(c["image"]) for c in answer["cells"]}
    assert abs(by_weights["UNet + TE"] - cells[(1.0, 3, "in memory")]).max() == 0
    assert abs(by_weights["UNet only"] - cells[(0.0, 3, "in memory")]).max() == 0
    # and as the X/Y/Z plot's own axis (strength 1 and the LoRA in memory by default)
    info = webui.call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = next(a["choices"] for a in xyz["args"] if a["label"] == "X type")
    script_args = [choices.index(WEIGHTS_AXIS), "UNet + TE, UNet only", [], 0, "", [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    _, images = webui.generate({"prompt": "box, red", "seed": 3, **SETTINGS, "script_name": "x/y/z plot",
                                "script_args": script_args})
    assert len(images) == 1 + 2
    assert abs(images[1] - cells[(1.0, 3, "in memory")]).max() == 0
    assert abs(images[2] - cells[(0.0, 3, "in memory")]).max() == 0


def test_our_axes_in_the_xyz_plot_render_the_grid_images(webui, unet_and_te_lora, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    _train(webui, dataset, unet_and_te_lora)  # the in-memory LoRA of the module's run again (another test trained)
    info = webui.call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = next(a["choices"] for a in xyz["args"] if a["label"] == "X type")
    assert STRENGTH_AXIS in choices and SNAPSHOT_AXIS in choices
    x_type, y_type = choices.index(STRENGTH_AXIS), choices.index(SNAPSHOT_AXIS)
    script_args = [x_type, "0, 1", [], y_type, "", ["in memory", unet_and_te_lora], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    answer, images = webui.generate({"prompt": "box, red", "seed": 4, **SETTINGS, "script_name": "x/y/z plot",
                                     "script_args": script_args})
    assert len(images) == 1 + 4  # the grid, then each cell (x fastest): (0, mem), (1, mem), (0, file), (1, file)
    assert images[0].shape[0] > 2 * 64 and images[0].shape[1] > 2 * 64
    grid = _cells(webui.call(GRID, {"prompt": "box, red", "strengths": [0, 1], "seeds": [4], **SETTINGS}))
    assert abs(images[1] - grid[(0.0, 4, "in memory")]).max() == 0
    assert abs(images[2] - grid[(1.0, 4, "in memory")]).max() == 0
    assert abs(images[4] - grid[(1.0, 4, unet_and_te_lora)]).max() == 0
    assert "LoRA Trainer: in memory at 1" in answer["info"]
    assert abs(_plain(webui, "box, red", 4) - images[1]).max() == 0, "our LoRA is off after the X/Y/Z plot"
    for path in (Path(A1111_DIR) / "models" / "Lora").glob(f"{unet_and_te_lora}-grid-*.png"):
        path.unlink()


def test_bad_input_and_another_model_are_refused_with_the_model_untouched(webui, unet_and_te_lora):
    webui.use_checkpoint(webui.titles["sd1"])
    for body, needle in (({"prompt": ""}, "prompt: empty"), ({"prompt": "box", "width": 60}, "multiple of 8"),
                         ({"prompt": "box", "strengths": [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                           "seeds": list(range(8))}, "exceed the limit of 64"),
                         ({"prompt": "box", "sampler_name": "No such"}, "not a sampler of this WebUI")):
        with pytest.raises(urllib.error.HTTPError) as error:
            webui.call(GRID, {**SETTINGS, **body})
        assert error.value.code == 400 and needle in error.value.read().decode()
    webui.use_checkpoint(webui.titles["sdxl"])
    try:
        base = _plain(webui, "box", 5)
        with pytest.raises(urllib.error.HTTPError) as error:
            webui.call(GRID, {"prompt": "box", "strengths": [1], "seeds": [5], **SETTINGS})
        assert error.value.code == 400 and "model changed since training" in error.value.read().decode()
        assert abs(_plain(webui, "box", 5) - base).max() == 0
    finally:
        webui.use_checkpoint(webui.titles["sd1"])
