"""Networks on the real model adapters: a LoRA trained on one tree (diffusers) works unchanged on another (ldm)."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.models.adapter import TextConditioning
from lora_trainer.networks import LoRANetwork, load_lora, save_lora, unet_block_index


def _cfg(**values):
    base = dict(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="locon")
    base.update(values)
    return type("Cfg", (), base)()


def _randomize(network, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _predict(adapter, cross_dim):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 77, cross_dim, generator=gen)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor([400]), TextConditioning(ctx))


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir)


@pytest.fixture(scope="module")
def ldm_sd1(tiny_sd1):
    from lora_trainer.models.ldm_adapter import LdmAdapter
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    return LdmAdapter(build_ldm_model(tiny_sd1.yaml, tiny_sd1.checkpoint))


def test_lora_from_diffusers_tree_gives_same_prediction_on_ldm_tree(sd1, ldm_sd1, tmp_path):
    """The kohya names and conv layouts of both trees agree, so one file means one model."""
    targets = sd1.lora_targets(include_conv=True)
    cross_dim = sd1.unet().config.cross_attention_dim
    base_d, base_l = _predict(sd1, cross_dim), _predict(ldm_sd1, cross_dim)
    network = LoRANetwork.create(targets, _cfg())
    assert len(network.loras) == sum(len(v) for v in targets.values())
    assert {unet_block_index(n) for n in network.unet_names()} == set(range(1, 25))
    _randomize(network)
    network.apply()
    with_lora = _predict(sd1, cross_dim)
    assert not torch.allclose(with_lora, base_d, atol=1e-4)
    path = save_lora(tmp_path / "x.safetensors", network.state_dict_kohya(torch.float32), {"ss_network_dim": "4"})
    network.remove()
    assert torch.equal(_predict(sd1, cross_dim), base_d)

    sd, _ = load_lora(path)
    other = LoRANetwork.from_kohya(ldm_sd1.lora_targets(include_conv=True), sd)
    other.apply()
    torch.testing.assert_close(_predict(ldm_sd1, cross_dim), with_lora, rtol=1e-4, atol=1e-4)
    other.remove()
    assert torch.equal(_predict(ldm_sd1, cross_dim), base_l)


def test_sdxl_network_covers_unet_and_both_text_encoders(tiny_sdxl, tmp_path):
    from lora_trainer.models.loading import load_checkpoint_adapter

    xl = load_checkpoint_adapter(tiny_sdxl.checkpoint, config_dir=tiny_sdxl.config_dir)
    targets = xl.lora_targets()
    network = LoRANetwork.create(targets, _cfg(algo="lora", conv_dim=None))
    prefixes = {k.split("_")[1] for k in network.state_dict_kohya()}
    assert prefixes == {"unet", "te1", "te2"}
    assert all(unet_block_index(n) is not None for n in network.unet_names())
    groups = network.param_groups(unet_lr=1e-4, te_lr=1e-5)
    assert [g["name"] for g in groups] == ["textencoder", "unet"]
    path = save_lora(tmp_path / "xl.safetensors", network.state_dict_kohya(), {})
    rebuilt = LoRANetwork.from_kohya(targets, load_lora(path)[0])
    assert set(rebuilt.loras) == set(network.loras)
