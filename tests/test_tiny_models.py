"""Tiny real-architecture checkpoints: real key layout, exact diffusers round trip, ldm yaml, non-trivial weights."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.models.checkpoint import checkpoint_hash, detect_architecture
from lora_trainer.models.convert import (
    clip_l_diffusers_to_original,
    open_clip_diffusers_to_original,
    pipeline_to_original,
    unet_diffusers_to_original,
    vae_diffusers_to_original,
)
from lora_trainer.testing import build_tiny_model, full_size_original_state_dict

ARCHS = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def tiny(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


def _load_pipeline(model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if model.arch == "sdxl" else StableDiffusionPipeline
    return cls.from_single_file(str(model.checkpoint), config=str(model.config_dir), local_files_only=True)


@pytest.fixture(scope="module")
def pipelines(tiny):
    return {arch: _load_pipeline(tiny[arch]) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_key_set_is_the_real_architectures(tiny, arch):
    with safe_open(str(tiny[arch].checkpoint), "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    full = full_size_original_state_dict(arch)
    assert set(shapes) == set(full)
    assert all(len(shapes[k]) == full[k].ndim for k in full)
    assert sum(math.prod(s) for s in shapes.values()) < 0.03 * sum(v.numel() for v in full.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_from_single_file_round_trip_is_exact(tiny, pipelines, arch):
    original = load_file(str(tiny[arch].checkpoint))
    pipe = pipelines[arch]
    if arch == "sd2":
        # diffusers keeps 23 of OpenCLIP's 24 layers and no projection: compare what it loads.
        back = unet_diffusers_to_original(pipe.unet.state_dict(), arch)
        back.update(vae_diffusers_to_original(pipe.vae.state_dict()))
        back.update(open_clip_diffusers_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
        dropped = set(original) - set(back)
        assert len(dropped) == 13 and "cond_stage_model.model.text_projection" in dropped
        assert all(".resblocks.23." in k or k.endswith("text_projection") for k in dropped)
    else:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
        te_sds = [e.state_dict() for e in encoders]
        back = pipeline_to_original(pipe.unet.state_dict(), pipe.vae.state_dict(), te_sds, arch)
        assert set(back) == set(original)
    unequal = [k for k in back if not torch.equal(back[k], original[k])]
    assert not unequal


@pytest.mark.parametrize("arch", ARCHS)
def test_detect_architecture_on_tiny_files(tiny, arch):
    sd = load_file(str(tiny[arch].checkpoint))
    assert detect_architecture(sd, source=tiny[arch].checkpoint) == arch


def _attention_targets(unet) -> int:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    count = 0
    for block in unet.modules():
        if isinstance(block, Transformer2DModel):
            for module in block.modules():
                is_1x1 = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
                count += isinstance(module, torch.nn.Linear) or is_1x1
    return count


def _te_targets(encoder) -> int:
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    parents = [m for m in encoder.modules() if isinstance(m, (CLIPAttention, CLIPMLP))]
    return sum(isinstance(m, torch.nn.Linear) for p in parents for m in p.modules())


def test_module_counts_match_kohya_counts(pipelines):
    assert _attention_targets(pipelines["sd1"].unet) == 192
    assert _te_targets(pipelines["sd1"].text_encoder) == 72
    assert _attention_targets(pipelines["sdxl"].unet) == 722
    assert _te_targets(pipelines["sdxl"].text_encoder) + _te_targets(pipelines["sdxl"].text_encoder_2) == 264


def test_weights_are_non_trivial(tiny, pipelines):
    norms = ("model.diffusion_model.out.0.weight", "first_stage_model.decoder.norm_out.weight")
    outputs = ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias",
               "model.diffusion_model.output_blocks.0.0.out_layers.3.weight")
    for arch in ARCHS:
        with safe_open(str(tiny[arch].checkpoint), "pt") as handle:
            sd = {k: handle.get_tensor(k) for k in norms + outputs}
        for key in norms:
            assert (sd[key] - 1).abs().mean() > 0.05, (arch, key)
        for key in outputs:
            assert sd[key].abs().mean() > 1e-3, (arch, key)
    pipe = pipelines["sd1"]
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids).last_hidden_state
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
    assert hidden.mean(dim=-1).abs().mean() > 0.01 and hidden.std() > 0.1
    assert out.std() > 0.05 and torch.isfinite(out).all()


def test_text_encoder_dir_loads_offline_and_matches(tiny):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = tiny["sd1"]
    encoder = CLIPTextModel.from_pretrained(model.text_encoder_dir, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(model.text_encoder_dir, local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    written = clip_l_diffusers_to_original(encoder.state_dict(), "sd1")
    original = load_file(str(model.checkpoint))
    assert all(torch.equal(v, original[k]) for k, v in written.items())


def test_yaml_is_the_webui_layout(tiny):
    sd1 = yaml.safe_load(tiny["sd1"].yaml.read_text())["model"]
    assert sd1["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert sd1["params"]["cond_stage_config"]["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert sd1["params"]["cond_stage_config"]["params"]["version"] == str(tiny["sd1"].text_encoder_dir)
    assert os.path.isabs(sd1["params"]["cond_stage_config"]["params"]["version"])
    assert tiny["sd1"].yaml.stem == tiny["sd1"].checkpoint.stem
    sd2 = yaml.safe_load(tiny["sd2"].yaml.read_text())["model"]["params"]
    assert "parameterization" not in sd2 and sd2["unet_config"]["params"]["use_linear_in_transformer"]
    xl = yaml.safe_load(tiny["sdxl"].yaml.read_text())["model"]
    assert xl["target"] == "sgm.models.diffusion.DiffusionEngine"
    embedders = xl["params"]["conditioner_config"]["params"]["emb_models"]
    assert embedders[0]["params"]["version"] == str(tiny["sdxl"].text_encoder_dir)
    assert xl["params"]["network_config"]["params"]["transformer_depth"] == [1, 2, 10]


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_ldm_builds_the_same_networks_from_the_yaml(tiny, pipelines, arch):
    """Stability's own UNet and VAE classes, built from the yaml, load the file strictly and compute the same."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel", reason="Stability's ldm package not installed")
    from ldm.util import instantiate_from_config

    params = yaml.safe_load(tiny[arch].yaml.read_text())["model"]["params"]
    sd = load_file(str(tiny[arch].checkpoint))
    unet = instantiate_from_config(params["unet_config"]).eval()
    unet.load_state_dict({k[22:]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, strict=True)
    pipe = pipelines[arch]
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        ours = pipe.unet(x, torch.tensor([321]), encoder_hidden_states=context).sample
        theirs = unet(x, torch.tensor([321]), context=context)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_cache_reuse_and_seed(tmp_path):
    first = build_tiny_model("sd1", tmp_path / "m", seed=3)
    stamp = first.checkpoint.stat().st_mtime_ns
    digest = checkpoint_hash(first.checkpoint).sha256
    again = build_tiny_model("sd1", tmp_path / "m", seed=3)
    assert again == first and again.checkpoint.stat().st_mtime_ns == stamp
    other = build_tiny_model("sd1", tmp_path / "m", seed=4)
    assert checkpoint_hash(other.checkpoint).sha256 != digest
    assert json.loads((tmp_path / "m" / "tiny_model.json").read_text())["seed"] == 4


def test_sd2_v_variant(tmp_path, tiny):
    model = build_tiny_model("sd2-v", tmp_path / "v", seed=0)
    assert checkpoint_hash(model.checkpoint).sha256 == checkpoint_hash(tiny["sd2"].checkpoint).sha256
    sched = json.loads((model.config_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert yaml.safe_load(model.yaml.read_text())["model"]["params"]["parameterization"] == "v"
    assert detect_architecture(load_file(str(model.checkpoint)), v_parameterization=True) == "sd2-v"


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sd3"):
        build_tiny_model("sd3", tmp_path)


def _blocky_image(seed: int) -> torch.Tensor:
    """`[1,3,64,64]` in [-1, 1], one random colour per 8x8 block: what the tiny VAE's 8x8 latent can hold exactly."""
    colours = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return colours.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def _square_image(folder) -> torch.Tensor:
    """A training image of the demo's kind (a square at a random place, edges not on the 8x8 grid)."""
    from PIL import Image

    from lora_trainer.testing.datasets import write_square_dataset

    write_square_dataset(folder, count=1)
    image = Image.open(folder / "1_square" / "000.png").convert("RGB")
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(64, 64, 3)
    return (pixels / 127.5 - 1).permute(2, 0, 1)[None]


def _ldm_vae(model):
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    return build_ldm_model(model.yaml, model.checkpoint).first_stage_model


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tiny_vae_reconstructs_its_input(pipelines, arch, tmp_path):
    vae = pipelines[arch].vae
    scale = vae.config.scaling_factor
    with torch.no_grad():
        blocky = _blocky_image(1)
        latents = vae.encode(blocky).latent_dist.sample() * scale
        back = vae.decode(latents / scale).sample
        square = _square_image(tmp_path)
        square_back = vae.decode(vae.encode(square).latent_dist.sample()).sample
    assert (back - blocky).abs().max() < 1e-3  # 8x8 blocks come back exactly
    # the latent is the image at 1/8 size: colours in [-1, 1] after the scaling factor, the fourth channel 0
    assert torch.allclose(latents[:, :3], blocky[:, :, ::8, ::8], atol=1e-3) and latents[:, 3].abs().max() < 1e-3
    assert (square_back - square).abs().mean() < 0.1  # only the square's edges blur


def test_tiny_vae_reconstructs_in_the_webui_ldm_classes(tiny):
    vae = _ldm_vae(tiny["sd1"])
    with torch.no_grad():
        blocky = _blocky_image(2)
        back = vae.decode(vae.encode(blocky).sample())
    assert (back - blocky).abs().max() < 1e-3


def test_identity_unet_predicts_its_input_as_the_noise(tmp_path):
    from diffusers import StableDiffusionPipeline

    model = build_tiny_model("sd1", tmp_path, identity_unet=True)
    pipe = StableDiffusionPipeline.from_single_file(str(model.checkpoint), config=str(model.config_dir),
                                                    local_files_only=True)
    ids = pipe.tokenizer(["a cat", "a red square"], padding="max_length", max_length=77, return_tensors="pt")
    noise = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3).repeat(2, 1, 1, 1)
    with torch.no_grad():
        text = pipe.text_encoder(ids.input_ids).last_hidden_state
        out = pipe.unet(noise, torch.tensor([999, 10]), encoder_hidden_states=text).sample
    rms = out.pow(2).mean(dim=(2, 3)).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # each latent channel's prediction has unit RMS
    similarity = torch.nn.functional.cosine_similarity(out.flatten(1), noise.flatten(1))
    assert (similarity > 0.9).all()  # the input itself, slightly blurred by the skip connections from below
    # prompt and timestep reach only the blocks a LoRA trains, not the prediction
    assert torch.allclose(out[0], out[1], atol=1e-5)
