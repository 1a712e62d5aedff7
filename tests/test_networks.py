"""Every network type x layer kind: zero init, bypass == merged weights, restore, multiplier, round trip, dropout."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_trainer.errors import NetworkError
from lora_trainer.networks import LoRANetwork, load_lora, save_lora

ALGOS = ["lora", "loha", "lokr", "lokr_low_rank"]
KINDS = ["linear", "conv1x1", "conv3x3", "mha"]
# LoKr's second factor is full at these small ranks; rank 1 with factor 2 makes it the low-rank pair.
_ALGO_VALUES = {"lokr_low_rank": dict(algo="lokr", network_dim=1, conv_dim=1, factor=2)}
_SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},
    "lokr_low_rank": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


def _cfg(algo, **extra):
    values = dict(network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=1.5, algo=algo)
    values.update(_ALGO_VALUES.get(algo, {}))
    values.update(extra)
    return type("Cfg", (), values)()


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 12), torch.randn(2, 5, 16)
    if kind == "conv1x1":
        return nn.Conv2d(8, 6, 1), torch.randn(2, 8, 7, 7)
    if kind == "conv3x3":
        return nn.Conv2d(8, 6, 3, stride=2, padding=1), torch.randn(2, 8, 9, 9)
    return nn.MultiheadAttention(16, 2), torch.randn(5, 2, 16)  # OpenCLIP's classic (L, N, E) layout


def _targets(kind, layer):
    if kind == "mha":
        base = "lora_te_text_model_encoder_layers_0_self_attn"
        return {"te": {f"{base}_{p}": layer for p in ("q_proj", "k_proj", "v_proj", "out_proj")}}
    name = "lora_unet_down_blocks_0_attentions_0_proj_in" if kind != "conv3x3" else \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    return {"unet": {name: layer}}


def _run(kind, layer, x):
    with torch.no_grad():
        return layer(x, x, x, need_weights=False)[0] if kind == "mha" else layer(x)


def _randomize(network):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _merged_copy(kind, layer, network):
    merged = copy.deepcopy(layer)
    with torch.no_grad():
        if kind == "mha":
            parts = {n.rsplit("_", 2)[-2]: m for n, m in network.loras.items()}
            merged.in_proj_weight += torch.cat([parts[p].delta_weight() * network.multiplier for p in "qkv"])
            merged.out_proj.weight += parts["out"].delta_weight() * network.multiplier
        else:
            (module,) = network.loras.values()
            merged.weight += module.delta_weight() * network.multiplier
    return merged


@pytest.fixture(params=[(a, k) for a in ALGOS for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    algo, kind = request.param
    layer, x = _layer(kind)
    network = LoRANetwork.create(_targets(kind, layer), _cfg(algo))
    return algo, kind, layer, x, network


def test_fresh_network_is_bit_identical_and_random_weights_change_output(case):
    algo, kind, layer, x, network = case
    expected = _run(kind, layer, x)
    network.apply()
    assert torch.equal(_run(kind, layer, x), expected)
    _randomize(network)
    assert not torch.allclose(_run(kind, layer, x), expected, atol=1e-3)


def test_bypass_delta_equals_merged_weight_delta(case):
    algo, kind, layer, x, network = case
    _randomize(network)
    network.multiplier = 0.7
    merged = _merged_copy(kind, layer, network)
    network.apply()
    torch.testing.assert_close(_run(kind, layer, x), _run(kind, merged, x), rtol=1e-4, atol=1e-4)


def test_remove_restores_forward_and_weights_exactly(case):
    algo, kind, layer, x, network = case
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    expected = _run(kind, layer, x)
    network.apply()
    _randomize(network)
    assert not torch.equal(_run(kind, layer, x), expected)
    network.remove()
    assert "forward" not in layer.__dict__
    assert torch.equal(_run(kind, layer, x), expected)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_multiplier_zero_gives_base_and_is_read_each_forward(case):
    algo, kind, layer, x, network = case
    expected = _run(kind, layer, x)
    _randomize(network)
    network.multiplier = 0.5
    half_merged = _merged_copy(kind, layer, network)
    network.multiplier = 1.0
    network.apply()
    full = _run(kind, layer, x)
    network.multiplier = 0.0
    assert torch.equal(_run(kind, layer, x), expected)
    network.multiplier = 0.5
    half = _run(kind, layer, x)
    assert not torch.allclose(half, full, atol=1e-4)
    torch.testing.assert_close(half, _run(kind, half_merged, x), rtol=1e-4, atol=1e-4)


def test_state_dict_file_round_trip_gives_same_outputs(case, tmp_path):
    algo, kind, layer, x, network = case
    _randomize(network)
    network.apply()
    expected = _run(kind, layer, x)
    sd = network.state_dict_kohya(dtype=torch.float32)
    suffixes = {k.split(".", 1)[1] for k in sd}
    assert suffixes == _SUFFIXES[algo]
    assert all(sd[k].dim() == 0 for k in sd if k.endswith(".alpha"))
    save_lora(tmp_path / "a.safetensors", sd, {"ss_network_dim": "4"})
    network.remove()

    loaded_sd, meta = load_lora(tmp_path / "a.safetensors")
    assert meta["ss_network_dim"] == "4"
    fresh = LoRANetwork.create(_targets(kind, layer), _cfg(algo))
    report = fresh.load_kohya(loaded_sd)
    assert sorted(report.loaded) == sorted(fresh.loras) and not report.unmatched
    fresh.apply()
    assert torch.equal(_run(kind, layer, x), expected)
    fresh.remove()
    rebuilt = LoRANetwork.from_kohya(_targets(kind, layer), loaded_sd)
    rebuilt.apply()
    assert torch.equal(_run(kind, layer, x), expected)


def test_dropouts_act_only_in_train_mode(case):
    algo, kind, layer, x, network = case
    dropped = LoRANetwork.create(_targets(kind, layer), _cfg(algo, network_dropout=0.5, rank_dropout=0.5,
                                                             module_dropout=0.3))
    _randomize(dropped)
    dropped.apply()
    dropped.eval()
    first = _run(kind, layer, x)
    assert torch.equal(first, _run(kind, layer, x))
    dropped.train()
    torch.manual_seed(3)
    outs = [_run(kind, layer, x) for _ in range(6)]
    assert any(not torch.equal(o, first) for o in outs)


def test_module_dropout_one_skips_the_delta_in_training():
    layer, x = _layer("linear")
    expected = _run("linear", layer, x)
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora", module_dropout=1.0))
    _randomize(network)
    network.apply()
    network.train()
    assert torch.equal(_run("linear", layer, x), expected)
    network.eval()
    assert not torch.equal(_run("linear", layer, x), expected)


def test_rank_dropout_rescales_kept_ranks():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64, bias=False)
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora", network_dim=64, network_alpha=64,
                                                                 rank_dropout=0.5))
    _randomize(network)
    network.apply()
    x = torch.randn(256, 64)
    with torch.no_grad():
        base = x @ layer.weight.T
        network.eval()
        clean = layer(x) - base
        network.train()
        noisy = torch.stack([layer(x) - base for _ in range(40)]).mean(0)
    # E[masked / (1 - p)] equals the clean delta.
    assert (noisy - clean).abs().mean() < 0.25 * clean.abs().mean()


def test_gradients_reach_network_parameters_only():
    layer, x = _layer("conv3x3")
    layer.requires_grad_(False)
    network = LoRANetwork.create(_targets("conv3x3", layer), _cfg("loha"))
    network.apply()
    layer(x).square().sum().backward()
    grads = {n: p.grad for n, p in network.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert layer.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_precision(dtype, tmp_path):
    layer, _ = _layer("linear")
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora"))
    save_lora(tmp_path / "p.safetensors", network.state_dict_kohya(dtype=dtype), {})
    sd, _ = load_lora(tmp_path / "p.safetensors")
    assert {v.dtype for v in sd.values()} == {dtype}
    assert float(sd["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0


def test_unmatched_keys_are_rejected_with_their_names():
    layer, _ = _layer("linear")
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora"))
    sd = network.state_dict_kohya(torch.float32)
    sd["lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"] = torch.zeros(4, 16)
    with pytest.raises(NetworkError, match="lora_unet_mid_block_attentions_0_proj_out"):
        network.load_kohya(sd)
    report = network.load_kohya(sd, strict=False)
    assert report.unmatched == ["lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"]


def test_shape_mismatch_names_key_and_shapes_and_loads_nothing():
    layer, _ = _layer("linear")
    small = LoRANetwork.create(_targets("linear", layer), _cfg("lora", network_dim=8))
    _randomize(small)
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora"))
    before = network.state_dict_kohya(torch.float32)
    with pytest.raises(NetworkError, match=r"lora_down\.weight: shape \(8, 16\).*\(4, 16\).*another architecture"):
        network.load_kohya(small.state_dict_kohya(torch.float32))
    assert all(torch.equal(before[k], v) for k, v in network.state_dict_kohya(torch.float32).items())


def test_missing_modules_rejected_when_strict():
    layer, _ = _layer("linear")
    other = nn.Linear(16, 12)
    targets = {"unet": {"lora_unet_a_proj": layer, "lora_unet_b_proj": other}}
    network = LoRANetwork.create(targets, _cfg("lora"))
    sd = {k: v for k, v in network.state_dict_kohya(torch.float32).items() if k.startswith("lora_unet_a_")}
    with pytest.raises(NetworkError, match="lora_unet_b_proj"):
        network.load_kohya(sd)
    assert network.load_kohya(sd, strict=False).missing == ["lora_unet_b_proj"]


def test_loha_file_into_lora_network_is_refused():
    layer, _ = _layer("linear")
    loha = LoRANetwork.create(_targets("linear", layer), _cfg("loha"))
    lora = LoRANetwork.create(_targets("linear", layer), _cfg("lora"))
    with pytest.raises(NetworkError, match="hada_w1_a"):
        lora.load_kohya(loha.state_dict_kohya())


def test_conv3x3_without_conv_dim_gets_no_module_and_unsupported_targets_fail():
    layer, _ = _layer("conv3x3")
    assert len(LoRANetwork.create(_targets("conv3x3", layer), _cfg("lora", conv_dim=None)).loras) == 0
    with pytest.raises(NetworkError, match="LayerNorm"):
        LoRANetwork.create({"unet": {"lora_unet_norm": nn.LayerNorm(4)}}, _cfg("lora"))


def test_batch_first_attention_in_training_matches_merged_weights():
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(16, 4, batch_first=True, dropout=0.0).train()
    x = torch.randn(2, 6, 16)
    network = LoRANetwork.create(_targets("mha", layer), _cfg("lora"))
    _randomize(network)
    merged = _merged_copy("mha", layer, network)
    network.apply()
    mask = torch.triu(torch.full((6, 6), float("-inf")), 1)
    out = layer(x, x, x, attn_mask=mask, need_weights=False)[0]
    ref = merged(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize("algo", ALGOS)
def test_half_precision_base_keeps_its_dtype(algo):
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    network = LoRANetwork.create(_targets("linear", layer), _cfg(algo))
    _randomize(network)
    network.apply()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = x.float() @ (layer.weight.float() + next(iter(network.loras.values())).delta_weight()).T + layer.bias.float()
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_new_network_starts_without_dropout():
    layer, x = _layer("linear")
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora", network_dropout=0.9, module_dropout=0.5))
    assert not network.training
    _randomize(network)
    network.apply()
    first = _run("linear", layer, x)
    assert all(torch.equal(first, _run("linear", layer, x)) for _ in range(5))


def test_key_helpers():
    from lora_trainer.networks import component_of, kohya_name, split_key
    from lora_trainer.networks.keys import fused_attention_part

    assert kohya_name("te2", "text_model.encoder.layers.0.mlp.fc1") == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert [component_of(f"lora_{c}_x") for c in ("unet", "te", "te1", "te2")] == ["unet", "te", "te1", "te2"]
    assert component_of("model_x") is None
    assert split_key("lora_unet_a_b.lora_up.weight") == ("lora_unet_a_b", "lora_up.weight")
    assert fused_attention_part("lora_te2_x_self_attn_out_proj") == ("lora_te2_x_self_attn", "out_proj")
    assert fused_attention_part("lora_te2_x_mlp_fc1") is None
    with pytest.raises(ValueError, match="te3"):
        kohya_name("te3", "a.b")


def test_file_without_alpha_means_scale_one():
    layer, x = _layer("linear")
    network = LoRANetwork.create(_targets("linear", layer), _cfg("lora", network_alpha=1.0))
    _randomize(network)
    sd = {k: v for k, v in network.state_dict_kohya(torch.float32).items() if not k.endswith(".alpha")}
    network.load_kohya(sd)
    (module,) = network.loras.values()
    assert module.scale == 1.0 and float(module.alpha) == 4.0


@pytest.mark.parametrize("key,value", [("rank_dropout", 1.0), ("network_dropout", -0.1), ("network_dim", 0)])
def test_bad_settings_name_the_key(key, value):
    layer, _ = _layer("linear")
    with pytest.raises(NetworkError, match=key):
        LoRANetwork.create(_targets("linear", layer), _cfg("lora", **{key: value}))
