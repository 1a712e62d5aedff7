"""The command line as a user runs it: train from a kohya TOML, the demo, and errors that name the fix."""
from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from lora_trainer.__main__ import main
from lora_trainer.config import load_toml
from lora_trainer.networks import load_lora
from lora_trainer.testing.datasets import write_square_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def write_config(path, tiny, dataset, output, extra=""):
    path.write_text(
        f'pretrained_model_name_or_path = "{tiny.checkpoint}"\n'
        f'diffusers_config_dir = "{tiny.config_dir}"\n'
        f'tokenizer_dir = "{tiny.tokenizer_dir}"\n'
        f'train_data_dir = "{dataset}"\n'
        f'output_dir = "{output}"\n'
        'output_name = "cli_lora"\nresolution = "64,64"\nnetwork_dim = 4\nnetwork_alpha = 2\n'
        'learning_rate = 1e-3\nmax_train_steps = 3\ntrain_batch_size = 2\ncache_latents = true\nseed = 7\n'
        'xformers = true\nmy_typo_key = 1\n' + extra,
        encoding="utf-8",
    )
    return path


def test_train_writes_a_kohya_lora_with_its_config(tiny_sd1, tmp_path, capsys):
    dataset = write_square_dataset(tmp_path / "data", folder="5_mychar", caption="mychar, red square")
    config = write_config(tmp_path / "run.toml", tiny_sd1, dataset, tmp_path / "out")

    assert main(["train", "--config", str(config), "--set", "network_dim=8", "--device", "cpu"]) == 0

    out = capsys.readouterr().out
    assert "unknown key 'my_typo_key'" in out
    assert "'xformers' is accepted but not used" in out
    lora = tmp_path / "out" / "cli_lora.safetensors"
    state_dict, metadata = load_lora(lora)
    downs = [k for k in state_dict if k.endswith(".lora_down.weight")]
    assert len(downs) == 192 + 72 and all(state_dict[k].shape[0] == 8 for k in downs)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "8"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"5_mychar": {"n_repeats": 5, "img_count": 4}}
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(tiny_sd1.checkpoint.read_bytes()).hexdigest()
    saved = load_toml(tmp_path / "out" / "cli_lora.toml").config
    assert saved.network.network_dim == 8 and saved.training.max_train_steps == 3


def test_train_refuses_a_caption_that_is_not_utf8(tiny_sd1, tmp_path, capsys):
    folder = write_square_dataset(tmp_path / "data", folder="5_mychar", caption="mychar, red square") / "5_mychar"
    (folder / "001.txt").write_bytes("mychar, caf\xe9".encode("latin-1"))
    config = write_config(tmp_path / "run.toml", tiny_sd1, folder.parent, tmp_path / "out")

    assert main(["train", "--config", str(config), "--device", "cpu"]) == 1

    err = capsys.readouterr().err
    assert "001.txt" in err and "re-save it as UTF-8" in err and err.count("error:") == 1
    assert not (tmp_path / "out" / "cli_lora.safetensors").exists()


def test_train_names_a_bad_key_and_value(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('optimizer_type = "AdamQ"\n', encoding="utf-8")

    assert main(["train", "--config", str(config)]) == 2

    err = capsys.readouterr().err
    assert "optimizer_type" in err and "AdamQ" in err and "AdamW" in err


def test_demo_learns_its_images(tmp_path, capsys):
    # the demo's own code path with fewer steps: samples at strength 1 must be much nearer the training images
    assert main(["demo", "--out", str(tmp_path), "--steps", "30"]) == 0

    assert (tmp_path / "lora" / "demo_lora.safetensors").is_file()
    assert len(json.loads((tmp_path / "losses.json").read_text())) == 30
    assert Image.open(tmp_path / "loss.png").width > 100
    distances = json.loads((tmp_path / "distances.json").read_text())
    assert set(distances) == {"0", "0.5", "1"}
    assert distances["1"] < distances["0"] - 15, distances  # 0-255 scale: 84 at strength 0, 58 at 1 after 30 steps
    out = capsys.readouterr().out
    assert f"strength 0: {distances['0']:.1f}" in out and f"strength 1: {distances['1']:.1f}" in out
    # labelled grid: a label strip above and left of 2 prompts x (3 strengths + a training image), 64 px cells x4
    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > 4 * 256 and grid.height > 2 * 256
    left, top = grid.width - 4 * 256, grid.height - 2 * 256
    cells = [grid.crop((left + x * 256, top, left + x * 256 + 256, top + 256)) for x in range(4)]
    assert cells[0].tobytes() != cells[2].tobytes(), "the LoRA at strength 1 must change the image"
    training_image = Image.open(sorted((tmp_path / "dataset" / "10_demostyle").glob("*.png"))[0]).convert("RGB")
    assert cells[3].tobytes() == training_image.resize((256, 256), Image.NEAREST).tobytes()
    label_strip = grid.crop((left, 0, grid.width, top)).convert("L")
    assert label_strip.getextrema()[0] < 100  # dark label text on the white strip


