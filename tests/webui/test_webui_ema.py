"""The EMA of the LoRA weights in a real AUTOMATIC1111 WebUI (see webui_harness.py): a run with `ema = true` writes
`<name>-ema.safetensors` into the WebUI's Lora folder, and the grid route and our X/Y/Z snapshot axis render the raw
and the EMA LoRA side by side, in memory and from the files. Skipped when A1111_DIR is not set."""
from __future__ import annotations

import os
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
MEMORY, MEMORY_EMA = "in memory", "in memory (EMA)"


def test_raw_and_ema_side_by_side_through_the_webui(webui, dataset):
    webui.use_checkpoint(webui.titles["sd1"])
    name = f"lt_test_sd1_{STAMP}_ema"
    status = webui.train({"train_data_dir": str(dataset), "resolution": "64,64", "output_name": name,
                          "max_train_steps": 8, "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4,
                          "cache_latents": True, "seed": 1, "save_precision": "float", "ema": True,
                          "ema_decay": 0.9, "ema_warmup": False})
    assert status["state"] == "finished", status["message"]
    assert (Path(A1111_DIR) / "models" / "Lora" / f"{name}-ema.safetensors").is_file()
    labels = [MEMORY, MEMORY_EMA, name, f"{name} (EMA)"]
    answer = webui.call(GRID, {"prompt": "box, red", "strengths": [0, 1], "seeds": [2], "snapshots": labels,
                               **SETTINGS})
    cells = {(c["strength"], c["snapshot"]): decode_png(c["image"]) for c in answer["cells"]}
    base = cells[(0.0, MEMORY)]
    assert all(abs(cells[(0.0, label)] - base).max() == 0 for label in labels)
    assert abs(cells[(1.0, MEMORY)] - cells[(1.0, MEMORY_EMA)]).mean() > 0.5, "the EMA lags the trained weights"
    assert abs(cells[(1.0, MEMORY_EMA)] - cells[(1.0, f"{name} (EMA)")]).mean() < 0.5  # float file
    assert abs(cells[(1.0, MEMORY)] - cells[(1.0, name)]).mean() < 0.5

    info = webui.call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = next(a["choices"] for a in xyz["args"] if a["label"] == "X type")
    script_args = [choices.index("LoRA Trainer: snapshot"), "", [MEMORY, MEMORY_EMA], 0, "", [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    reply, images = webui.generate({"prompt": "box, red", "seed": 2, **SETTINGS, "script_name": "x/y/z plot",
                                    "script_args": script_args})
    assert len(images) == 1 + 2  # the grid, then (in memory, in memory (EMA)) at strength 1
    assert abs(images[1] - cells[(1.0, MEMORY)]).max() == 0
    assert abs(images[2] - cells[(1.0, MEMORY_EMA)]).max() == 0
    assert MEMORY_EMA in reply["info"]
    for path in (Path(A1111_DIR) / "models" / "Lora").glob(f"{name}-grid-*.png"):
        path.unlink()
