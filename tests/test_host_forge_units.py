"""The host-independent parts the Forge host relies on, on real modules: inference tensors made ordinary in place
(bit-identical, trainable through, one tensor copied at a time), and Linear layers that do not subclass nn.Linear
(as Forge's `ForgeOperations.Linear`) found as LoRA targets under the same kohya names."""
from __future__ import annotations

import torch
from torch import nn

from lora_trainer.host.handshake import make_ordinary, state_fingerprint
from lora_trainer.models.naming import te_targets, unet_targets
from lora_trainer.networks import LoRAModule
from lora_trainer.networks.base import is_linear


class ModuleLinear(nn.Module):
    """A Linear that is an nn.Module only (the shape of Forge's own Linear class)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def _swap_linears(root: nn.Module) -> int:
    swapped = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, ModuleLinear(child))
                swapped += 1
    return swapped


def _inference_model():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64))
        model.register_buffer("scale", torch.full((64,), 0.5))
    return model


def test_inference_weights_block_backward_until_made_ordinary():
    model = _inference_model()
    lora = LoRAModule("lora_x", model[0], dim=4, alpha=4)
    lora.apply()
    x = torch.randn(2, 64)
    try:
        model(x).sum().backward()
        raise AssertionError("autograd should refuse inference tensors")
    except RuntimeError as error:
        assert "nference" in str(error)
    lora.restore()

    fingerprint = state_fingerprint(model)
    report = make_ordinary([model, model[0]])  # shared subtrees are converted once
    assert report.converted == 7 and report.bytes == sum(t.numel() * 4 for t in model.state_dict().values())
    assert report.peak_extra_bytes == 256 * 64 * 4  # the largest single tensor, never the whole model
    assert not any(t.is_inference() for t in model.state_dict().values())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert state_fingerprint(model) == fingerprint

    lora = LoRAModule("lora_x", model[0], dim=4, alpha=4)
    lora.apply()
    for p in model.parameters():
        p.requires_grad_(False)
    (model(x) ** 2).sum().backward()
    assert lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
    lora.restore()
    assert state_fingerprint(model) == fingerprint


def test_make_ordinary_hands_freed_memory_back_as_it_goes():
    calls = []
    model = _inference_model()
    make_ordinary([model], release=lambda: calls.append(1), release_every=256 * 64 * 4)
    assert len(calls) == 2  # after each of the two 64 KiB weights


def test_make_ordinary_leaves_ordinary_tensors_alone():
    model = nn.Linear(4, 4)
    weight = model.weight
    assert make_ordinary([model]).converted == 0 and model.weight is weight


def test_module_only_linears_get_the_same_kohya_names(tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    adapter = load_checkpoint_adapter(tiny_sd1.checkpoint)
    unet, text = adapter.unet(), adapter.text_encoders()[0]
    expected_unet = unet_targets(unet, "sd1", "diffusers", include_conv=True)
    expected_te = te_targets(text, "lora_te_")
    assert _swap_linears(unet) > 10 and _swap_linears(text) > 10
    assert not any(type(m) is nn.Linear for m in text.modules() if m is not text)
    found_unet = unet_targets(unet, "sd1", "diffusers", include_conv=True)
    found_te = te_targets(text, "lora_te_")
    assert list(found_unet) == list(expected_unet) and list(found_te) == list(expected_te)
    assert all(isinstance(found_te[name], ModuleLinear) for name in found_te)


def test_is_linear_by_duck_typing():
    assert is_linear(nn.Linear(3, 2)) and is_linear(ModuleLinear(nn.Linear(3, 2)))
    assert not is_linear(nn.Conv2d(3, 2, 1)) and not is_linear(nn.Embedding(5, 3)) and not is_linear(nn.LayerNorm(3))


class InPlaceBlock(nn.Module):
    """Adds in place into a tensor a LayerNorm saved for backward, as Forge's transformer blocks do."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + 0
        x += self.proj(self.norm(x))
        x += self.proj(self.norm(x))
        return x


def test_forge_blocks_train_with_their_in_place_adds_made_out_of_place():
    from lora_trainer.host.forge_adapter import OutOfPlaceAdds, _training_forward

    block, x = InPlaceBlock(), torch.randn(2, 8, requires_grad=True)
    try:
        block(x).pow(2).sum().backward()
        raise AssertionError("the in-place add should break backward")
    except RuntimeError as error:
        assert "inplace" in str(error)
    with OutOfPlaceAdds():
        expected = block(x)
    expected.pow(2).sum().backward()
    grad = block.proj.weight.grad.clone()
    block.zero_grad()
    block.forward = _training_forward(block)  # checkpointed: the recompute runs out of place too
    out = block(x)
    assert torch.equal(out, expected)
    out.pow(2).sum().backward()
    assert torch.allclose(block.proj.weight.grad, grad)


def test_quantised_unet_storage_is_refused_with_the_checkpoint_route():
    from types import SimpleNamespace

    import pytest

    from lora_trainer.errors import ModelLoadError
    from lora_trainer.host.forge import refuse_quantised

    def engine(storage, dtype):
        kmodel = nn.Linear(4, 4).to(dtype)
        kmodel.storage_dtype = storage
        unet = SimpleNamespace(model=kmodel)
        info = SimpleNamespace(filename="model.safetensors")
        return SimpleNamespace(forge_objects=SimpleNamespace(unet=unet), sd_checkpoint_info=info)

    refuse_quantised(engine(torch.float16, torch.float16))
    for storage, dtype in (("nf4", torch.float32), ("gguf", torch.float32), (torch.float8_e4m3fn, torch.float8_e4m3fn),
                           (torch.float32, torch.float8_e5m2)):
        with pytest.raises(ModelLoadError) as info:
            refuse_quantised(engine(storage, dtype))
        assert "float weights" in str(info.value) and "model.safetensors" in str(info.value)
