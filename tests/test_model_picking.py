"""Picking a model by its file alone: sizes derived from the checkpoint's tensor shapes (heads from its same-named
`.yaml`, else the architecture's convention), the yaml's v-parameterization, and clear errors for a bad yaml."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.configs import config_dir
from lora_trainer.models.derived_configs import derive_configs
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.testing.tiny_models import build_tiny_model, full_size_original_state_dict

# Values the shipped configs leave to diffusers' defaults.
DIFFUSERS_DEFAULTS = {"use_linear_projection": False, "transformer_layers_per_block": 1}


def _outputs(adapter) -> dict:
    """Everything a run takes from the model: predictions, latents, text conditioning, schedule."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    torch.manual_seed(0)  # the VAE samples its latents
    size_cond = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]) if adapter.architecture == "sdxl" else None
    with torch.no_grad():
        cond = adapter.encode_captions(["a red square, smile"])
        return {
            "predict": adapter.predict(latents, torch.tensor([500]), cond, size_cond),
            "decoded": adapter.decode_latents(latents),
            "latents": adapter.encode_images(pixels),
            "crossattn": cond.crossattn,
            "pooled": cond.pooled,
            "prediction_type": adapter.prediction_type,
            "alphas": adapter.alphas_cumprod,
        }


def _assert_same(a: dict, b: dict) -> None:
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_tiny_model_loads_from_its_file_alone(arch, tiny_models_dir, single_thread):
    tiny = build_tiny_model(arch, tiny_models_dir / arch, seed=0)
    explicit = load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir,
                                       v_parameterization=arch == "sd2-v")
    alone = load_checkpoint_adapter(tiny.checkpoint)
    assert alone.architecture == explicit.architecture == arch
    for name in ("unet", "vae"):  # all but sample_size (a default image size, not in the weights)
        derived, given = getattr(alone, f"_{name}").config, getattr(explicit, f"_{name}").config
        keys = [k for k in given if not k.startswith("_") and k != "sample_size"]
        assert {k: derived[k] for k in keys} == {k: given[k] for k in keys}, name
    _assert_same(_outputs(alone), _outputs(explicit))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_shapes_give_the_shipped_configs(arch):
    shapes = {key: tuple(value.shape) for key, value in full_size_original_state_dict(arch).items()}
    derived = derive_configs(shapes, arch)
    for sub, config in derived.items():
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        shipped = json.loads((config_dir(arch) / sub / name).read_text(encoding="utf-8"))
        expected = {**{k: v for k, v in DIFFUSERS_DEFAULTS.items() if sub == "unet"}, **shipped}
        assert config == expected, sub


def _copy_model(tiny, folder, yaml_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / tiny.checkpoint.name
    shutil.copyfile(tiny.checkpoint, checkpoint)
    if yaml_text is not None:
        checkpoint.with_suffix(".yaml").write_text(yaml_text, encoding="utf-8")
    return checkpoint


def test_yaml_v_parameterization_makes_sd2_v_prediction(tiny_sd2, tmp_path):
    yaml_text = tiny_sd2.yaml.read_text(encoding="utf-8")
    assert "parameterization" not in yaml_text
    v_yaml = yaml_text.replace("params:\n", "params:\n    parameterization: v\n", 1)
    checkpoint = _copy_model(tiny_sd2, tmp_path / "v", v_yaml)
    shutil.copyfile(tiny_sd2.yaml.parent / "tiny-sd2-te.json", checkpoint.parent / "tiny-sd2-te.json")
    adapter = load_checkpoint_adapter(checkpoint)                  # no v_parameterization = true anywhere
    assert adapter.architecture == "sd2-v"
    assert adapter.prediction_type == "v_prediction"


def test_malformed_yaml_is_named(tiny_sd1, tmp_path):
    checkpoint = _copy_model(tiny_sd1, tmp_path / "bad", "model:\n  params: [unclosed\n")
    with pytest.raises(ModelLoadError, match=r"tiny_sd1\.yaml: not valid YAML"):
        load_checkpoint_adapter(checkpoint)
    checkpoint.with_suffix(".yaml").write_text("model:\n  target: x\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tiny_sd1\.yaml: no model\.params section"):
        load_checkpoint_adapter(checkpoint)


def test_yaml_that_contradicts_the_weights_is_named(tiny_sd1, tmp_path):
    text = tiny_sd1.yaml.read_text(encoding="utf-8").replace("in_channels: 4", "in_channels: 9", 1)
    checkpoint = _copy_model(tiny_sd1, tmp_path / "inpaint", text)
    with pytest.raises(ModelLoadError, match=r"tiny_sd1\.yaml: in_channels = 9 \(an inpainting model's yaml\)"):
        load_checkpoint_adapter(checkpoint)


def test_heads_without_yaml_follow_the_convention_or_say_how(tiny_sd2, tmp_path):
    checkpoint = _copy_model(tiny_sd2, tmp_path / "noyaml")      # 32-wide levels cannot have 64-wide heads
    with pytest.raises(ModelLoadError, match=r"cannot be split into .*heads\. Put the WebUI's \.yaml"):
        load_checkpoint_adapter(checkpoint)


def test_yaml_gives_heads_and_sgm_v_scaling(tiny_sdxl, tmp_path):
    from lora_trainer.models.model_yaml import read_model_yaml

    found = read_model_yaml(tiny_sdxl.checkpoint)
    assert found.path == tiny_sdxl.yaml and not found.v_parameterization
    assert found.unet["num_head_channels"] == 16 and found.text_heads == (4, 4)  # CLIP-L folder, OpenCLIP json
    text = tiny_sdxl.yaml.read_text(encoding="utf-8").replace("scaling.EpsScaling", "scaling.VScaling")
    checkpoint = _copy_model(tiny_sdxl, tmp_path / "v", text)
    assert read_model_yaml(checkpoint).v_parameterization
    assert read_model_yaml(checkpoint).text_heads == (4, None)  # the OpenCLIP json was not copied beside it
