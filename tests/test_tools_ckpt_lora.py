"""Bake a LoRA into a checkpoint and extract a LoRA from two checkpoints, on tiny real-architecture models."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.__main__ import main
from lora_trainer.errors import ModelLoadError, NetworkError
from lora_trainer.models.checkpoint import checkpoint_hash
from lora_trainer.networks import LoRANetwork, load_lora
from lora_trainer.testing.lora_files import random_lora, tiny_targets
from lora_trainer.tools.bake import LoraToBake, bake_loras, parse_lora_spec
from lora_trainer.tools.blocks import slot_of, slots
from lora_trainer.tools.extract import NothingToExtract, extract_lora, svd_factors
from lora_trainer.tools.inspect_lora import inspect_lora
from lora_trainer.tools.lora_file import read_lora

ARCHS = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def locons(request, tmp_path_factory):
    """Per architecture: (tiny model, its LoCon targets, a random LoCon file)."""
    folder = tmp_path_factory.mktemp("ckpt_lora")
    made = {}

    def get(arch):
        if arch not in made:
            tiny = request.getfixturevalue(f"tiny_{arch}")
            targets = tiny_targets(tiny, include_conv=True)
            path = random_lora(targets, folder / f"{arch}_locon.safetensors", dim=4, alpha=2.0, conv_dim=2,
                               conv_alpha=1.0, architecture=arch)
            made[arch] = (tiny, targets, path)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_bake_then_full_rank_extract_recovers_the_delta(arch, locons, tmp_path, single_thread):
    tiny, targets, lora_path = locons(arch)
    before = checkpoint_hash(tiny.checkpoint).sha256
    baked = bake_loras(tiny.checkpoint, [LoraToBake(lora_path, 0.8)], tmp_path / "baked.safetensors",
                       precision="fp32", hash_inputs=False)
    source = read_lora(lora_path)
    assert baked.modules == len(source.modules)
    extracted = extract_lora(baked.path, tiny.checkpoint, tmp_path / "ex.safetensors", dim=10**6, conv_dim=10**6,
                             clamp_quantile=1.0, precision="fp32")
    result = read_lora(extracted.path)
    assert set(result.modules) == set(source.modules) and extracted.skipped_text_encoders == []
    worst = 0.0
    for name, module in source.modules.items():
        want = 0.8 * module.delta().reshape(result.modules[name].shape)
        worst = max(worst, float((result.delta(name) - want).abs().max() / want.abs().max()))
    assert worst < 1e-4
    # the file loads into a network on the model's own modules, every key matched (the trainer's key check)
    state_dict, metadata = load_lora(extracted.path)
    network = LoRANetwork.from_kohya(targets, state_dict, strict=True)
    assert len(network.loras) == len(source.modules)
    report = inspect_lora(extracted.path)
    assert report.keys_ok and report.outside_kohya_targets == [] and report.architecture == arch
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_v2"] == str(arch == "sd2")
    assert metadata["ss_base_model_version"].startswith("sdxl" if arch == "sdxl" else "sd_v")
    assert checkpoint_hash(tiny.checkpoint).sha256 == before


def test_bake_adds_q_k_v_into_the_fused_open_clip_weight(locons, tmp_path):
    tiny, _, lora_path = locons("sd2")
    baked = bake_loras(tiny.checkpoint, [LoraToBake(lora_path, -0.5)], tmp_path / "b.safetensors",
                       hash_inputs=False)
    source = read_lora(lora_path)
    before, after = load_file(str(tiny.checkpoint)), load_file(str(baked.path))
    base = "lora_te_text_model_encoder_layers_3_self_attn_"
    delta = torch.cat([source.delta(base + p) for p in ("q_proj", "k_proj", "v_proj")])
    key = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"
    assert torch.allclose(after[key], before[key] + (-0.5) * delta, atol=1e-6)
    out_key = "cond_stage_model.model.transformer.resblocks.3.attn.out_proj.weight"
    assert torch.allclose(after[out_key], before[out_key] - 0.5 * source.delta(base + "out_proj"), atol=1e-6)


def test_bake_with_block_weights_scales_each_slot(locons, tmp_path):
    tiny, _, lora_path = locons("sd1")
    vector = [0.0] + [0.5] * 12 + [1.0] + [0.25] * 12  # BASE (text encoder) off
    baked = bake_loras(tiny.checkpoint, [LoraToBake(lora_path, 1.0, tuple(vector))], tmp_path / "b.safetensors",
                       hash_inputs=False)
    weights = dict(zip(slots("sd1"), vector))
    source = read_lora(lora_path)
    before, after = load_file(str(tiny.checkpoint)), load_file(str(baked.path))
    checked = set()
    for name, key in (("lora_te_text_model_encoder_layers_0_mlp_fc1",
                       "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
                      ("lora_unet_down_blocks_1_attentions_0_proj_in", "model.diffusion_model.input_blocks.4.1.proj_in.weight"),
                      ("lora_unet_mid_block_attentions_0_proj_out", "model.diffusion_model.middle_block.1.proj_out.weight"),
                      ("lora_unet_up_blocks_3_resnets_2_conv2", "model.diffusion_model.output_blocks.11.0.out_layers.3.weight")):
        w = weights[slot_of(name)]
        checked.add(w)
        want = before[key] + w * source.delta(name).reshape(before[key].shape)
        assert torch.allclose(after[key], want, atol=1e-6), name
    assert checked == {0.0, 0.5, 1.0, 0.25}
    with pytest.raises(ValueError, match="17 or 26"):
        bake_loras(tiny.checkpoint, [LoraToBake(lora_path, 1.0, (1.0,) * 20)], tmp_path / "c.safetensors")


def test_extract_of_identical_checkpoints_writes_nothing(tiny_sd1, tmp_path):
    with pytest.raises(NothingToExtract, match="nothing to extract"):
        extract_lora(tiny_sd1.checkpoint, tiny_sd1.checkpoint, tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_extract_leaves_an_identical_text_encoder_out(tiny_sd1, tmp_path):
    targets = tiny_targets(tiny_sd1)
    unet_only = random_lora({"unet": targets["unet"]}, tmp_path / "u.safetensors", dim=2)
    baked = bake_loras(tiny_sd1.checkpoint, [LoraToBake(unet_only)], tmp_path / "b.safetensors", hash_inputs=False)
    result = extract_lora(baked.path, tiny_sd1.checkpoint, tmp_path / "e.safetensors", dim=3)
    assert result.skipped_text_encoders == ["te"] and result.te_max_diff["te"] == 0.0
    sd, meta = load_lora(result.path)
    names = {key.split(".")[0] for key in sd}
    assert names == set(targets["unet"]) and result.modules == len(names)
    assert all(sd[f"{n}.lora_down.weight"].shape[0] <= 3 for n in names)
    assert all(float(sd[f"{n}.alpha"]) == sd[f"{n}.lora_down.weight"].shape[0] for n in names)
    assert meta["ss_network_dim"] == "3" and all(v.dtype == torch.float16 for k, v in sd.items() if "alpha" not in k)


def test_svd_factors_cap_the_rank_and_clamp():
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 3, 3, 3, generator=generator)
    full = svd_factors(conv, 100, clamp_quantile=1.0)
    up, down = full.up, full.down
    assert up.shape == (6, 6, 1, 1) and down.shape == (6, 3, 3, 3) and abs(full.retained - 1) < 1e-6
    assert torch.allclose((up.reshape(6, 6) @ down.reshape(6, -1)).reshape(conv.shape), conv, atol=1e-5)
    exact = svd_factors(conv, 2, clamp_quantile=1.0)
    exact_up, exact_down = exact.up, exact.down
    s = torch.linalg.svdvals(conv.reshape(6, -1))
    assert abs(exact.retained - float(s[:2].pow(2).sum() / s.pow(2).sum())) < 1e-6
    limit = torch.quantile(torch.cat([exact_up.flatten(), exact_down.flatten()]), 0.9)
    clamped = svd_factors(conv, 2, clamp_quantile=0.9)
    up, down = clamped.up, clamped.down
    assert up.shape == (6, 2, 1, 1) and down.shape == (2, 3, 3, 3)
    assert torch.allclose(up, exact_up.clamp(-limit, limit)) and torch.allclose(down, exact_down.clamp(-limit, limit))
    assert not torch.equal(up, exact_up)


def test_bad_inputs_are_refused_by_name(locons, tiny_sd1, tiny_sdxl, tmp_path):
    _, _, sdxl_lora = locons("sdxl")
    with pytest.raises(ValueError, match="a sd1 checkpoint, but .* is sdxl"):
        extract_lora(tiny_sdxl.checkpoint, tiny_sd1.checkpoint, tmp_path / "x.safetensors")
    with pytest.raises(NetworkError, match="sdxl LoRA"):
        bake_loras(tiny_sd1.checkpoint, [LoraToBake(sdxl_lora)], tmp_path / "x.safetensors")
    _, _, sd1_lora = locons("sd1")
    with pytest.raises(ValueError, match="one of the inputs"):
        bake_loras(tiny_sd1.checkpoint, [LoraToBake(sd1_lora)], sd1_lora)
    with pytest.raises(ValueError, match="written as .safetensors"):
        bake_loras(tiny_sd1.checkpoint, [LoraToBake(sd1_lora)], tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_pickled_checkpoints_load_weights_only(tiny_sd1, locons, tmp_path):
    _, _, lora_path = locons("sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1.checkpoint)), "global_step": 10}, ckpt)
    baked = bake_loras(ckpt, [LoraToBake(lora_path, 0.5)], tmp_path / "b.safetensors", hash_inputs=False)
    assert baked.modules > 0
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": _Payload()}, handle)
    with pytest.raises(ModelLoadError, match="arbitrary pickles are not loaded"):
        bake_loras(evil, [LoraToBake(lora_path)], tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


class _Payload:
    """Stands for an object whose unpickling would run code."""


def test_lora_spec_parsing():
    assert parse_lora_spec("a/b.safetensors:0.8").ratio == 0.8
    assert parse_lora_spec("b.safetensors:-1e-1").ratio == -0.1
    spec = parse_lora_spec(r"C:\loras\b.safetensors")
    assert spec.ratio == 1.0 and str(spec.path) == r"C:\loras\b.safetensors"


def test_cli_bake_extract_merge_prune(tiny_sd1, locons, tmp_path, capsys):
    _, _, lora_path = locons("sd1")
    ckpt = str(tiny_sd1.checkpoint)
    baked, lora, merged, pruned = (str(tmp_path / n) for n in ("b.safetensors", "l.safetensors", "m.safetensors",
                                                               "p.safetensors"))
    assert main(["bake", ckpt, f"{lora_path}:0.8", "--out", baked, "--precision", "fp32"]) == 0
    assert main(["extract", baked, ckpt, "--dim", "8", "--conv-dim", "2", "--out", lora]) == 0
    assert main(["ckpt-merge", ckpt, baked, "--block-alpha", ",".join(["0.5"] * 26), "--out", merged]) == 0
    assert main(["prune", merged, "--out", pruned, "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 4
    assert main(["ckpt-merge", ckpt, baked, "--block-alpha", "1,0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["extract", ckpt, ckpt, "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_sdxl_lora_with_diffusers_unet_names_bakes_the_same(locons, tmp_path):
    from lora_trainer.networks import save_lora
    from lora_trainer.tools.ckpt_keys import lora_targets
    from lora_trainer.tools.tensor_stream import TensorReader

    tiny, _, lora_path = locons("sdxl")
    with TensorReader(tiny.checkpoint) as reader:
        spelling = {t.name: alias for alias, t in lora_targets(reader.infos, "sdxl", aliases=True).items()
                    if alias != t.name}
    sd, meta = load_lora(lora_path)
    renamed = {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        renamed[f"{spelling.get(name, name)}.{suffix}"] = value
    assert any(key.startswith("lora_unet_down_blocks_1_attentions_0_") for key in renamed)
    other = save_lora(tmp_path / "diffusers_names.safetensors", renamed, meta)
    first = bake_loras(tiny.checkpoint, [LoraToBake(lora_path)], tmp_path / "a.safetensors", hash_inputs=False)
    second = bake_loras(tiny.checkpoint, [LoraToBake(other)], tmp_path / "b.safetensors", hash_inputs=False)
    a, b = load_file(str(first.path)), load_file(str(second.path))
    assert first.modules == second.modules and all(torch.equal(a[k], b[k]) for k in a)


def test_fast_svd_is_near_the_exact_one_at_low_rank():
    generator = torch.Generator().manual_seed(0)
    # a fine-tune-like difference: decaying spectrum plus noise
    left, right = torch.randn(320, 64, generator=generator), torch.randn(64, 768, generator=generator)
    delta = (left * torch.logspace(0, -3, 64)) @ right + 1e-4 * torch.randn(320, 768, generator=generator)
    exact = svd_factors(delta, 8, clamp_quantile=1.0)
    fast = svd_factors(delta, 8, clamp_quantile=1.0, fast=True)
    assert fast.up.shape == exact.up.shape and fast.down.shape == exact.down.shape
    assert fast.retained <= exact.retained + 1e-6 and exact.retained - fast.retained < 1e-3
    errors = [float((f.up @ f.down - delta).norm()) for f in (fast, exact)]
    assert errors[0] < 1.01 * errors[1]
