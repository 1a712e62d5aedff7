"""Reading files of other trainers: LoKr, Tucker LoCon/LoHa, PEFT names, alpha/scale rules, architecture detection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_trainer.errors import NetworkError
from lora_trainer.tools import lora_from_state_dict

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1: 320 -> 320
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1: 3x3, 320 -> 320


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def test_tucker_locon_delta_is_what_the_three_convolutions_do():
    down, mid, up = _rand(4, 320, 1, 1), _rand(4, 4, 3, 3, seed=1), _rand(320, 4, 1, 1, seed=2)
    lora = lora_from_state_dict({f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid,
                                 f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(2.0)})
    x = _rand(1, 320, 6, 6, seed=3)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5
    assert lora.modules[CONV].shape == (320, 320, 3, 3)
    torch.testing.assert_close(F.conv2d(x, lora.delta(CONV), padding=1), chained, rtol=1e-4, atol=1e-4)
    factors = lora.factors(CONV)
    assert factors.down.shape == (4, 320, 3, 3) and factors.scale == 0.5


def test_lokr_linear_and_conv_deltas_follow_the_kronecker_product():
    w1, w2a, w2b = _rand(4, 4), _rand(80, 2, seed=1), _rand(2, 80, seed=2)
    conv_w2b = _rand(2, 80 * 9, seed=3)
    lora = lora_from_state_dict({
        f"{LINEAR}.lokr_w1": w1, f"{LINEAR}.lokr_w2_a": w2a, f"{LINEAR}.lokr_w2_b": w2b,
        f"{LINEAR}.alpha": torch.tensor(1.0),
        f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2_a": w2a, f"{CONV}.lokr_w2_b": conv_w2b,
    })
    torch.testing.assert_close(lora.delta(LINEAR), torch.kron(w1, w2a @ w2b) * 0.5)
    conv = lora.delta(CONV)
    assert conv.shape == (320, 320, 3, 3) and lora.modules[CONV].scale == 1.0  # no alpha: scale 1, as the WebUI
    # output channel 81 = block (1, j) of w1 times row 1 of w2; input channel 85 = block j=1, w2 column 5 * 9 + k
    w2 = (w2a @ conv_w2b).reshape(80, 80, 3, 3)
    torch.testing.assert_close(conv[81, 85], w1[1, 1] * w2[1, 5])
    assert lora.algorithm == "lokr"


def test_peft_names_scale_key_and_alpha_zero():
    a, b = _rand(4, 320), _rand(320, 4, seed=1)
    lora = lora_from_state_dict({f"{LINEAR}.lora_A.weight": a, f"{LINEAR}.lora_B.weight": b,
                                 f"{LINEAR}.scale": torch.tensor(0.25)})
    torch.testing.assert_close(lora.delta(LINEAR), b @ a * 0.25)
    zero = lora_from_state_dict({f"{LINEAR}.lora_down.weight": a, f"{LINEAR}.lora_up.weight": b,
                                 f"{LINEAR}.alpha": torch.tensor(0.0)})
    assert zero.modules[LINEAR].scale == 0.0  # the WebUI multiplies by alpha / rank = 0


def test_architecture_detection_from_names_shapes_and_metadata():
    sd1 = {f"{LINEAR}.lora_down.weight": _rand(4, 320), f"{LINEAR}.lora_up.weight": _rand(320, 4)}
    assert lora_from_state_dict(sd1).architecture == "sd1"
    assert lora_from_state_dict(sd1, {"ss_v2": "True"}).architecture == "sd2"
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    linear_proj = {f"{proj}.lora_down.weight": _rand(4, 320), f"{proj}.lora_up.weight": _rand(320, 4)}
    assert lora_from_state_dict(linear_proj).architecture == "sd2"  # SD2 projects with Linear layers
    xl = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    xl_sd = {f"{xl}.lora_down.weight": _rand(4, 640), f"{xl}.lora_up.weight": _rand(640, 4)}
    assert lora_from_state_dict(xl_sd).architecture == "sdxl"
    with pytest.raises(NetworkError, match="no LoRA modules"):
        lora_from_state_dict({"unet.down_blocks.0.lora.down.weight": _rand(4, 4)})
    with pytest.raises(NetworkError, match="lacks"):
        lora_from_state_dict({f"{LINEAR}.lora_down.weight": _rand(4, 320)})


def test_block_weights_scale_one_lokr_factor_and_keep_dora():
    from lora_trainer.tools import expand_vector, weighted_state_dict

    w1a, w1b, w2 = _rand(4, 2), _rand(2, 4, seed=1), _rand(80, 80, seed=2)
    lora = lora_from_state_dict({f"{LINEAR}.lokr_w1_a": w1a, f"{LINEAR}.lokr_w1_b": w1b, f"{LINEAR}.lokr_w2": w2,
                                 f"{LINEAR}.alpha": torch.tensor(1.0), f"{LINEAR}.dora_scale": torch.ones(1, 320)})
    vector = [1.0] * 26
    vector[2] = -0.5  # IN01 holds down_blocks_0_attentions_0
    state, result = weighted_state_dict(lora, expand_vector(vector, "sd1"))
    weighted = lora_from_state_dict(state)
    torch.testing.assert_close(weighted.delta(LINEAR), lora.delta(LINEAR) * -0.5)
    assert torch.equal(state[f"{LINEAR}.lokr_w2"], w2) and f"{LINEAR}.dora_scale" in state
    assert result.by_block["IN01"] == (1, -0.5)
