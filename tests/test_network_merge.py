"""MergedWeights: every network type x layer kind merged into the weights gives the bypass output; restore puts the
original Parameter objects back bit for bit; the merge runs in float32 and casts to the layer's dtype."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.errors import NetworkError
from lora_trainer.networks import LoRANetwork, MergedWeights

ALGOS = ["lora", "loha", "lokr"]
KINDS = ["linear", "conv3x3", "mha"]


def _cfg(algo):
    return type("Cfg", (), dict(network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=1.5, algo=algo))()


def _layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 12), (torch.randn(2, 5, 16),)
    if kind == "conv3x3":
        return nn.Conv2d(8, 6, 3, stride=2, padding=1), (torch.randn(2, 8, 9, 9),)
    x = torch.randn(5, 2, 16)
    return nn.MultiheadAttention(16, 2), (x, x, x)


def _targets(kind, layer):
    if kind == "mha":
        base = "lora_te_text_model_encoder_layers_0_self_attn"
        return {"te": {f"{base}_{p}": layer for p in ("q_proj", "k_proj", "v_proj", "out_proj")}}
    name = "lora_unet_down_blocks_0_attentions_0_proj_in" if kind == "linear" else \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    return {"unet": {name: layer}}


def _network(kind, layer, algo):
    network = LoRANetwork.create(_targets(kind, layer), _cfg(algo))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return network


def _out(layer, inputs):
    with torch.no_grad():
        out = layer(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _params(layer):
    return dict(layer.named_parameters())


def _bypass(network, layer, inputs, multiplier):
    """The layer's output with the network injected (bypass forwards) at `multiplier`: what a merge must give."""
    network.multiplier = multiplier
    network.apply()
    out = _out(layer, inputs)
    network.remove()
    return out


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kind", KINDS)
def test_merged_output_equals_bypass_and_restore_is_exact(algo, kind):
    layer, inputs = _layer(kind)
    network = _network(kind, layer, algo)
    before = {name: (param, param.detach().clone()) for name, param in _params(layer).items()}
    base = _out(layer, inputs)
    bypass = _bypass(network, layer, inputs, 0.6)
    merger = MergedWeights(network)
    merger.merge()
    assert merger.merged and any(p is not before[n][0] for n, p in _params(layer).items())
    merged = _out(layer, inputs)
    torch.testing.assert_close(merged, bypass, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged, base)
    merger.restore()
    for name, param in _params(layer).items():
        assert param is before[name][0] and torch.equal(param, before[name][1])
    assert torch.equal(_out(layer, inputs), base)


def test_multiplier_zero_merges_nothing_and_remerge_uses_the_originals():
    layer, inputs = _layer("linear")
    network = _network("linear", layer, "lora")
    original = layer.weight
    network.multiplier = 0.0
    merger = MergedWeights(network)
    merger.merge()
    assert layer.weight is original and not merger.merged
    network.multiplier = 0.5
    merger.merge()
    half = _out(layer, inputs)
    network.multiplier = 1.0
    merger.merge()  # from the originals again, not on top of the 0.5 merge
    (module,) = network.loras.values()
    expected = original.detach() + module.delta_weight().detach()
    assert torch.equal(layer.weight, expected)
    assert not torch.equal(_out(layer, inputs), half)
    merger.release()
    assert layer.weight is original


def test_half_precision_weights_are_merged_in_float32_then_cast():
    layer, _ = _layer("linear")
    layer.half()
    network = _network("linear", layer, "lora")
    network.multiplier = 0.7
    original = layer.weight
    (module,) = network.loras.values()
    expected = (original.detach().float() + module.delta_weight().detach().float() * 0.7).half()
    merger = MergedWeights(network)
    merger.merge()
    assert layer.weight.dtype == torch.float16 and torch.equal(layer.weight, expected)
    merger.restore()
    assert layer.weight is original


def test_an_injected_network_is_not_merged_twice():
    layer, _ = _layer("linear")
    network = _network("linear", layer, "lora")
    network.apply()
    with pytest.raises(NetworkError, match="bypass"):
        MergedWeights(network).merge()
    network.remove()


def test_later_merges_write_into_the_same_buffers_shared_between_mergers():
    layer, inputs = _layer("linear")
    original = layer.weight
    first, second = _network("linear", layer, "lora"), _network("linear", layer, "loha")
    buffers = {}
    merger = MergedWeights(first, buffers=buffers)
    first.multiplier = 0.5
    merger.merge()
    buffer = layer.weight
    merger.restore()
    first.multiplier = 1.0
    merger.merge()
    assert layer.weight is buffer and buffer is not original
    (module,) = first.loras.values()
    torch.testing.assert_close(layer.weight, original.detach() + module.delta_weight().detach())
    merger.restore()
    other = MergedWeights(second, buffers=buffers)
    second.multiplier = 0.3
    other.merge()
    (module,) = second.loras.values()
    assert layer.weight is buffer
    torch.testing.assert_close(layer.weight, original.detach() + 0.3 * module.delta_weight().detach())
    other.release()
    assert layer.weight is original and not buffers


def test_channels_last_kernels_merge_through_the_delta_weight():
    layer, inputs = _layer("conv3x3")
    layer.to(memory_format=torch.channels_last)
    network = _network("conv3x3", layer, "lora")
    bypass = _bypass(network, layer, inputs, 0.8)
    merger = MergedWeights(network)
    merger.merge()
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_out(layer, inputs), bypass, rtol=1e-5, atol=1e-5)
    merger.restore()
