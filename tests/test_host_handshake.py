"""The host handshake on the real ldm classes (Stability's `ldm`): freeze and give back bit-identical, gradients
through ldm's checkpointed blocks, the WebUI key-mapping self-test logic, and the WebUI caption chunking."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.errors import ModelLoadError
from lora_trainer.host.a1111_keys import check_names, file_module_names
from lora_trainer.host.a1111_text import chunk_count, encode_chunks
from lora_trainer.host.handshake import (
    borrowed_model,
    changed_weights,
    compare_with_file,
    restore_model,
    snapshot_model,
    state_fingerprint,
    weight_identities,
)
from lora_trainer.networks import LoRANetwork
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train import Trainer


@pytest.fixture(scope="module")
def ldm_model(tiny_sd1):
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    return build_ldm_model(tiny_sd1.yaml, tiny_sd1.checkpoint)


@pytest.fixture(scope="module")
def adapter(ldm_model):
    from lora_trainer.models.ldm_adapter import LdmAdapter

    return LdmAdapter(ldm_model, model_id="tiny-sd1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("handshake_data"), folder="1_box", count=2,
                                caption="box, item{i}", background=(20, 90, 180), fill=(230, 40, 20))


def _flags(model):
    return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [getattr(m, "use_checkpoint", None) for m in model.modules()],
            [getattr(m, "checkpoint", None) for m in model.modules()],
            ["forward" in m.__dict__ for m in model.modules()])


def test_trainer_run_through_the_handshake_leaves_the_model_bit_identical(ldm_model, adapter, dataset, tmp_path,
                                                                           tiny_sd1):
    ldm_model.model.diffusion_model.input_blocks[0][0].weight.requires_grad_(True)  # a host flag to give back
    before, flags = state_fingerprint(ldm_model), _flags(ldm_model)
    assert any(flags[2]), "the tiny yaml turns ldm's own checkpointing on; the test needs it"
    config = update_config(TrainConfig(), dict(
        train_data_dir=str(dataset), resolution=(64, 64), output_dir=str(tmp_path), output_name="hs",
        max_train_steps=2, learning_rate=1e-2, seed=3, cache_latents=True, network_dim=2, network_alpha=2,
        network_train_unet_only=False, gradient_checkpointing=True, save_precision="float",
    ))
    with borrowed_model(ldm_model, adapter) as snap:
        assert not any(p.requires_grad for p in ldm_model.parameters())
        assert snap.checkpoint_flags
        result = Trainer(config, adapter).run()
    assert result.steps == 2 and result.lora_path
    assert state_fingerprint(ldm_model) == before
    assert _flags(ldm_model) == flags
    assert compare_with_file(ldm_model.model.diffusion_model, tiny_sd1.checkpoint, "model.diffusion_model.") == []
    ldm_model.model.diffusion_model.input_blocks[0][0].weight.requires_grad_(False)


def test_handshake_gives_back_devices_dtypes_and_flags_after_an_error(ldm_model, adapter):
    before, flags = state_fingerprint(ldm_model), _flags(ldm_model)
    with pytest.raises(RuntimeError, match="boom"):
        with borrowed_model(ldm_model, adapter):
            network = LoRANetwork.create(adapter.lora_targets(), TrainConfig().network)
            network.apply()
            adapter.enable_gradient_checkpointing(True)
            ldm_model.train()
            ldm_model.first_stage_model.to(torch.float64)  # the run moved / cast something and then failed
            raise RuntimeError("boom")
    network.remove()
    assert state_fingerprint(ldm_model) == before
    assert _flags(ldm_model) == flags
    assert {p.dtype for p in ldm_model.first_stage_model.parameters()} == {torch.float32}


def test_restore_model_removes_leftover_forward_overrides(ldm_model):
    snap = snapshot_model(ldm_model)
    block = ldm_model.model.diffusion_model.output_blocks[0][0]
    block.forward = lambda *a, **k: None
    fixed = restore_model(ldm_model, snap)
    assert "forward" not in block.__dict__ and any("forward" in f for f in fixed)


def test_fp8_weights_are_refused_with_a_fix(ldm_model):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtype")
    layer = torch.nn.Linear(2, 2).to(torch.float8_e4m3fn)
    with pytest.raises(ModelLoadError, match="FP8 weight"):
        with borrowed_model(torch.nn.Sequential(layer)):
            pass


def test_compare_with_file_finds_a_merged_tensor(ldm_model, tiny_sd1):
    unet = ldm_model.model.diffusion_model
    weight = unet.out[2].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)  # what a merged LoRA does to a layer
    try:
        assert compare_with_file(unet, tiny_sd1.checkpoint, "model.diffusion_model.", ["out.2.weight"], limit=4) \
            == ["out.2.weight"]
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("trees", ["unet", "te"])
def test_every_lora_parameter_gets_a_gradient_through_checkpointed_ldm_blocks(ldm_model, adapter, trees):
    targets = adapter.lora_targets()
    net_cfg = update_config(TrainConfig(), dict(network_dim=2, network_alpha=2,
                                                network_train_unet_only=trees == "unet")).network
    torch.manual_seed(0)
    with borrowed_model(ldm_model, adapter):
        network = LoRANetwork.create(targets if trees == "unet" else {"te": targets["te"]}, net_cfg)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0, 0.1)  # lora_up starts at zero; random both sides so every gradient can be non-zero
        network.apply()
        network.train()
        try:
            adapter.enable_gradient_checkpointing(True)
            ldm_model.model.diffusion_model.train()
            assert not any(m.use_checkpoint for m in ldm_model.modules() if type(m).__name__ == "ResBlock")
            cond = adapter.encode_captions(["a box"])
            x = torch.randn(1, 4, 16, 16)  # mid block 2x2: self-attention over one token gives q/k no gradient
            out = adapter.predict(x, torch.tensor([500]), cond)
            out.square().mean().backward()
        finally:
            network.remove()
    params = dict(network.named_parameters())
    assert params
    zero = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert zero == [], f"{len(zero)} of {len(params)} LoRA parameters got no gradient: {zero[:3]}"


class _Networks:
    """The two lookups of the WebUI's Lora extension that the self-test calls; the mapping and model are real."""

    import re as _re

    re_x_proj = _re.compile(r"(.*)_([qkv]_proj)$")

    def __init__(self, text_prefix):
        self.text_prefix = text_prefix

    def convert_diffusers_name_to_compvis(self, key, is_sd2):
        return key.replace("lora_te_text_model_", self.text_prefix)


def test_self_test_flags_unmatched_and_misplaced_names(ldm_model, adapter):
    targets = adapter.lora_targets()["te"]
    mapping = {name.replace(".", "_"): m for name, m in ldm_model.cond_stage_model.named_modules()}
    # transformers 4.x (the WebUI's) has a `text_model` level; 5.x flattens it
    prefix = "transformer_text_model_" if any("transformer_text_model" in k for k in mapping) else "transformer_"
    networks = _Networks(prefix)
    report = check_names(targets, networks, mapping)
    assert report.ok and report.checked == len(targets) > 0
    first, second = list(targets)[:2]
    wrong = dict(targets, lora_te_bogus_module=targets[first])
    wrong[first] = targets[second]
    report = check_names(wrong, networks, mapping)
    assert report.unmatched == ["lora_te_bogus_module"] and report.misplaced == [first]


def test_file_module_names_and_chunk_counts():
    keys = ["lora_unet_a.lora_up.weight", "lora_unet_a.alpha", "lora_te_b.lora_down.weight"]
    assert list(file_module_names(keys)) == ["lora_unet_a", "lora_te_b"]
    assert [chunk_count(n) for n in (75, 150, 225, 0)] == [1, 2, 3, 1]


class _Chunk:
    def __init__(self, tokens):
        self.tokens, self.multipliers, self.fixes = tokens, [1.0] * len(tokens), []


class _Wrapper:
    """The WebUI wrapper's chunking interface over a real ldm CLIP embedder (for the chunk bookkeeping only)."""

    def __init__(self, embedder):
        self.embedder, self.hijack = embedder, type("H", (), {"fixes": None})()

    def empty_chunk(self):
        return _Chunk([49406] + [49407] * 76)

    def process_texts(self, texts):
        out = []
        for text in texts:
            ids = self.embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
            chunks = [ids[i:i + 75] for i in range(0, max(1, len(ids)), 75)]
            out.append([_Chunk([49406] + c + [49407] * (76 - len(c))) for c in chunks])
        return out, 0

    def process_tokens(self, tokens, multipliers):
        return self.embedder.transformer(input_ids=torch.tensor(tokens)).last_hidden_state


def test_encode_chunks_gives_a_fixed_length_for_short_and_long_captions(ldm_model):
    wrapper = _Wrapper(ldm_model.cond_stage_model)
    with torch.no_grad():
        z, pooled = encode_chunks(wrapper, ["a box", "box, " * 60], 2)
        single, _ = encode_chunks(wrapper, ["a box"], 1)
    assert z.shape[:2] == (2, 154) and pooled is None
    assert torch.equal(z[0, :77], single[0])
    assert not torch.equal(z[1, 77:], z[0, 77:])  # the long caption's second chunk is text, the short one's empty


def test_sd2_open_clip_model_is_bit_identical_after_a_text_encoder_run(tiny_sd2, dataset, tmp_path):
    """SD2 (OpenCLIP text tower with fused attention): LoRA on q/k/v/out of nn.MultiheadAttention, trained and
    taken off again through the handshake."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from lora_trainer.models.ldm_adapter import LdmAdapter
    from lora_trainer.testing.open_clip_tower import build_ldm_sd2

    model = build_ldm_sd2(tiny_sd2)
    if model is None:
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    adapter = LdmAdapter(model, tokenizer=CLIPTokenizer.from_pretrained(str(tiny_sd2.tokenizer_dir)))
    before, flags = state_fingerprint(model), _flags(model)
    config = update_config(TrainConfig(), dict(
        train_data_dir=str(dataset), resolution=(64, 64), output_dir=str(tmp_path), output_name="hs2",
        max_train_steps=2, learning_rate=1e-2, seed=3, cache_latents=True, network_dim=2, network_alpha=2,
        network_train_unet_only=False, gradient_checkpointing=True, save_precision="float",
    ))
    with borrowed_model(model, adapter):
        result = Trainer(config, adapter).run()
    assert result.steps == 2 and any(k.startswith("lora_te_") for k in load_file(result.lora_path))
    assert state_fingerprint(model) == before
    assert _flags(model) == flags


def test_a_half_precision_host_trains_under_autocast_with_float32_lora_weights(tiny_sd1, dataset, tmp_path):
    """The WebUI keeps weights in fp16/bf16: training runs in that dtype (autocast), the LoRA stays float32, and
    the host's half weights come back bit-identical."""
    from safetensors.torch import load_file

    from lora_trainer.models.ldm_adapter import LdmAdapter
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: ldm's GroupNorm32 feeds float32 activations to half weights, which CPU group_norm "
                    "refuses (the WebUI runs --no-half on CPU for the same reason)")
    model = build_ldm_model(tiny_sd1.yaml, tiny_sd1.checkpoint).to("cuda", torch.float16)
    adapter = LdmAdapter(model, model_id="tiny-sd1-fp16")
    before = state_fingerprint(model)
    config = update_config(TrainConfig(), {
        "train_data_dir": str(dataset), "resolution": (64, 64), "output_dir": str(tmp_path), "output_name": "bf",
        "max_train_steps": 2, "learning_rate": 1e-2, "seed": 3, "cache_latents": True, "network_dim": 2,
        "network_alpha": 2, "network_train_unet_only": True, "save_precision": "float",
    })
    with borrowed_model(model, adapter):
        trainer = Trainer(config, adapter)
        result = trainer.run()
        seen = {p.dtype for p in trainer.network.parameters()}
    assert result.steps == 2 and all(v == v for v in result.losses)
    assert seen == {torch.float32}
    assert {v.dtype for v in load_file(result.lora_path).values()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert state_fingerprint(model) == before


def test_weight_identities_show_a_replaced_or_written_weight_and_a_grid_merge_put_back(ldm_model, adapter):
    from lora_trainer.host.a1111_render import WeightCheck
    from lora_trainer.networks import MergedWeights

    unet = ldm_model.model.diffusion_model
    before = weight_identities(ldm_model)
    network = LoRANetwork.create(adapter.lora_targets(False), TrainConfig().network)
    network.eval()
    with torch.no_grad():
        for module in network.loras.values():
            module.lora_up.weight.normal_()
    merger = MergedWeights(network)
    merger.merge()
    replaced = changed_weights(before, weight_identities(ldm_model))
    assert replaced and all(name.endswith("weight") for name in replaced)
    merger.restore()
    assert changed_weights(before, weight_identities(ldm_model)) == []
    check = WeightCheck(ldm_model)
    first = next(iter(unet.parameters()))
    with torch.no_grad():
        first.mul_(1.0)  # the same bytes, but written: a weight a restore copied back into looks like this
    assert len(changed_weights(before, weight_identities(ldm_model))) == 1
    assert changed_weights(before, weight_identities(ldm_model), writes_expected=True) == []
    assert check.changed() and not check.changed(writes_expected=True)
