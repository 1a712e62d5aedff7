"""Networks on tiny real diffusers/transformers models: kohya block indices, block dims, LR groups, TE targets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.errors import NetworkError
from lora_trainer.networks import LoRANetwork, NetworkSettings, kohya_name, unet_block_index

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")


def _kohya_targets(root: nn.Module, component: str, classes: tuple, conv: bool) -> dict[str, nn.Module]:
    """kohya's rule, written out for the test: Linear / Conv2d (1x1 unless `conv`) inside the named classes."""
    out = {}
    for path, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            is_1x1 = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1 or (conv and isinstance(child, nn.Conv2d)):
                out[kohya_name(component, f"{path}.{child_path}")] = child
    return out


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def unet_targets(unet):
    linear = _kohya_targets(unet, "unet", UNET_TARGETS, conv=False)
    conv = _kohya_targets(unet, "unet", UNET_CONV_TARGETS, conv=True)
    return {"unet": linear}, {"unet": {**linear, **conv}}


def _unet_out(unet):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = torch.randn(1, 3, 8, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10]), ctx).sample


def _cfg(**values):
    base = dict(network_dim=4, network_alpha=1.0, algo="lora")
    base.update(values)
    return type("Cfg", (), base)()


def test_sd1_block_indices_follow_kohya(unet_targets):
    linear, with_conv = unet_targets
    blocks = {unet_block_index(n) for n in linear["unet"]}
    # Attention blocks of SD1's layout: IN01,02,04,05,07,08, MID, OUT03..OUT11.
    assert blocks == {1, 2, 4, 5, 7, 8, 12} | set(range(16, 25))
    assert {unet_block_index(n) for n in with_conv["unet"]} == set(range(1, 25))
    cases = {
        "lora_unet_down_blocks_0_attentions_1_proj_in": 2,
        "lora_unet_down_blocks_1_downsamplers_0_conv": 6,
        "lora_unet_down_blocks_3_resnets_1_conv2": 11,
        "lora_unet_mid_block_attentions_0_proj_out": 12,
        "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
        "lora_unet_up_blocks_3_attentions_2_proj_out": 24,
        "lora_unet_conv_in": None,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": None,
    }
    assert {n: unet_block_index(n) for n in cases} == cases


def test_sdxl_compvis_block_indices():
    assert unet_block_index("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == 4
    assert unet_block_index("lora_unet_input_blocks_8_0_in_layers_2") == 8
    assert unet_block_index("lora_unet_middle_block_1_proj_in") == 12
    assert unet_block_index("lora_unet_output_blocks_0_1_proj_out") == 13
    assert unet_block_index("lora_unet_output_blocks_8_0_skip_connection") == 21
    assert unet_block_index("lora_unet_time_embed_0") is None
    assert unet_block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") is None


def test_unet_network_injects_and_restores_exactly(unet, unet_targets):
    _, with_conv = unet_targets
    expected = _unet_out(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    network = LoRANetwork.create(with_conv, _cfg(algo="locon", conv_dim=2, conv_alpha=1))
    kinds = {(type(m).__name__, tuple(getattr(m, "kernel_size", ()))) for m in with_conv["unet"].values()}
    assert ("Conv2d", (3, 3)) in kinds and ("Conv2d", (1, 1)) in kinds and ("Linear", ()) in kinds
    assert len(network.loras) == len(with_conv["unet"])
    network.apply()
    assert torch.equal(_unet_out(unet), expected)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(std=0.5)
    assert not torch.allclose(_unet_out(unet), expected, atol=1e-4)
    network.remove()
    assert torch.equal(_unet_out(unet), expected)
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_block_dims_give_per_block_ranks_and_zero_means_no_module(unet_targets):
    _, with_conv = unet_targets
    dims = [0] + [2] * 11 + [3] + [5] * 11 + [0]   # OUT11 off
    alphas = [1.0] * 25
    conv_dims = [1] * 25
    conv_dims[12] = 0                                  # MID convs off
    network = LoRANetwork.create(with_conv, _cfg(block_dims=",".join(map(str, dims)), block_alphas=alphas,
                                                 conv_block_dims=conv_dims, conv_block_alphas=[0.5] * 25))
    for name, module in network.loras.items():
        idx = unet_block_index(name)
        is_kxk = module.conv is not None and tuple(module.weight_shape[2:]) != (1, 1)
        assert idx != 24 or is_kxk
        assert module.dim == (conv_dims[idx] if is_kxk else dims[idx])
        assert module.scale == pytest.approx((0.5 if is_kxk else 1.0) / module.dim)
    assert not any(unet_block_index(n) == 12 and m.conv is not None and m.weight_shape[-1] == 3
                   for n, m in network.loras.items())
    with pytest.raises(NetworkError, match="block_dims: 3 values given, 25 needed"):
        LoRANetwork.create(with_conv, _cfg(block_dims="1,2,3"))


def test_block_lr_weights_scale_groups_and_zero_removes_blocks(unet_targets):
    linear, _ = unet_targets
    down = [1.0] * 12
    down[1] = 0.0       # IN01 frozen out
    down[4] = 0.5
    cfg = _cfg(down_lr_weight=down, mid_lr_weight=2.0, up_lr_weight="1,1,1,1,1,1,1,1,1,1,1,0.25")
    network = LoRANetwork.create(linear, cfg)
    assert not any(unet_block_index(n) == 1 for n in network.loras)
    groups = network.param_groups(unet_lr=1e-4, te_lr=5e-5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert "unet_block_01" not in lrs
    assert lrs["unet_block_04"] == pytest.approx(0.5e-4)
    assert lrs["unet_block_12"] == pytest.approx(2e-4)
    assert lrs["unet_block_24"] == pytest.approx(0.25e-4)
    assert lrs["unet_block_02"] == pytest.approx(1e-4)
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len(network.trainable_parameters()) == len(list(network.parameters()))
    # A later LR weight of 0 freezes the block's parameters and leaves them out of the groups.
    later = _cfg(down_lr_weight=[1.0] * 4 + [0.0] + [1.0] * 7)
    groups = network.param_groups(unet_lr=1e-4, te_lr=None, cfg=later)
    assert "unet_block_04" not in {g["name"] for g in groups}
    assert all(not p.requires_grad for n, m in network.loras.items() if unet_block_index(n) == 4
               for p in m.parameters())
    assert len(network.trainable_parameters()) == sum(len(g["params"]) for g in groups)


def test_lr_weight_presets_and_threshold():
    settings = NetworkSettings.from_config(_cfg(down_lr_weight="cosine", block_lr_zero_threshold=0.1))
    assert settings.lr_weights[0] == pytest.approx(1.0)
    assert settings.lr_weights[11] == 0.0            # sin(0) = 0 <= threshold
    assert settings.lr_weights[12:] == [1.0] * 13


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12)
    return CLIPTextModel(config).eval()


def test_text_encoder_targets_groups_and_train_flags(clip, unet_targets):
    linear, _ = unet_targets
    te = _kohya_targets(clip, "te", TE_TARGETS, conv=False)
    assert len(te) == 12                              # q, k, v, out, fc1, fc2 per layer
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        expected = clip(ids).last_hidden_state
    network = LoRANetwork.create({**linear, "te": te}, _cfg())
    assert len(network.te_names()) == 12 and network.train_te and network.train_unet
    network.apply()
    with torch.no_grad():
        assert torch.equal(clip(ids).last_hidden_state, expected)
    groups = network.param_groups(unet_lr=1e-4, te_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-5), ("unet", 1e-4)]
    network.remove()
    assert len(LoRANetwork.create({**linear, "te": te}, _cfg(network_train_unet_only=True)).te_names()) == 0
    te_only = LoRANetwork.create({**linear, "te": te}, _cfg(network_train_text_encoder_only=True))
    assert te_only.unet_names() == [] and not te_only.train_unet
    assert [g["name"] for g in network.param_groups(unet_lr=None, te_lr=0.0, default_lr=1e-3)] == ["unet"]


def test_network_args_fill_unset_keys(unet_targets):
    _, with_conv = unet_targets
    cfg = _cfg(conv_dim=None, network_args=["conv_dim=2", "conv_alpha=1", "algo=loha", "dropout=0.1"])
    network = LoRANetwork.create(with_conv, cfg)
    assert network.algo == "loha" and network.settings.network_dropout == 0.1
    assert any(m.conv is not None and m.weight_shape[-1] == 3 and m.dim == 2 for m in network.loras.values())


def test_real_preset_config_builds_loha_with_conv_and_metadata(unet_targets):
    from lora_trainer.config import preset_config
    from lora_trainer.networks import TrainingFacts, build_metadata

    config = preset_config("sd1_style_loha")
    settings = NetworkSettings.from_config(config.network)
    assert settings.wants_conv and settings.algo == "loha"
    _, with_conv = unet_targets
    network = LoRANetwork.create(with_conv, config)          # a whole TrainConfig works too
    assert network.algo == "loha"
    assert {m.dim for m in network.loras.values()} == {16, 4}
    groups = network.param_groups(config.optimizer.unet_lr, config.optimizer.text_encoder_lr, config.network)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 6e-05)]
    meta = build_metadata(config, TrainingFacts(), "sd1")
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "16"
    assert '"algo": "loha"' in meta["ss_network_args"] and meta["ss_network_dropout"] == "0.1"
