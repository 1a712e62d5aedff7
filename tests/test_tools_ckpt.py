"""Streamed checkpoint I/O, checkpoint merge and prune, on tiny real-architecture checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.models.checkpoint import checkpoint_hash
from lora_trainer.tools.ckpt_merge import block_alphas, merge_checkpoints, merge_slot, merge_slots
from lora_trainer.tools.prune import prune_checkpoint
from lora_trainer.tools.tensor_stream import TensorInfo, TensorReader, write_safetensors

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    infos = [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_safetensors(path, infos, lambda info: tensors[info.key], metadata)


def _variant(src: Path, dst: Path, seed: int, extra: dict | None = None, drop: tuple = ()) -> Path:
    """A copy of a checkpoint with every float tensor moved by seeded noise (a second "model")."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in load_file(str(src)).items():
        if key in drop:
            continue
        if value.is_floating_point():
            value = value + 0.1 * torch.randn(value.shape, generator=generator).to(value.dtype)
        tensors[key] = value
    tensors.update(extra or {})
    return _write(dst, tensors, {"source": src.name})


@pytest.fixture(scope="module")
def sd1_models(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt_merge")
    b = _variant(tiny_sd1.checkpoint, folder / "b.safetensors", 1, extra={"model.only_in_b": torch.ones(3)})
    c = _variant(tiny_sd1.checkpoint, folder / "c.safetensors", 2, drop=("first_stage_model.decoder.conv_out.bias",))
    return tiny_sd1.checkpoint, b, c


def test_streamed_write_reads_back_bit_identical(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=generator),
        "f16": torch.randn(3, 2, 3, 3, generator=generator).half(),
        "bf16": torch.randn(11, generator=generator).bfloat16(),
        "f64": torch.randn(2, 2, generator=generator).double(),
        "i64": torch.arange(77)[None],
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(4.6052),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
    }
    path = _write(tmp_path / "s.safetensors", tensors, {"note": "kept", "ss_x": "1"})
    loaded = load_file(str(path))
    assert list(loaded) == list(tensors) or set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key].view(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"note": "kept", "ss_x": "1"}
    with TensorReader(path) as reader:
        assert reader.metadata == {"note": "kept", "ss_x": "1"}
        assert torch.equal(reader.get("f32"), tensors["f32"])
    # the library's own writer gives the same tensors (same format, not only what our reader accepts)
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    reference = load_file(str(tmp_path / "ref.safetensors"))
    assert all(torch.equal(reference[k].view(-1).view(torch.uint8), loaded[k].view(-1).view(torch.uint8))
               for k in tensors)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    infos = [TensorInfo("a", torch.float32, (2,)), TensorInfo("b", torch.float32, (2,))]

    def producer(info):
        if info.key == "b":
            raise RuntimeError("input went away")
        return torch.zeros(2)

    with pytest.raises(RuntimeError):
        write_safetensors(target, infos, producer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    with pytest.raises(ValueError, match="a: produced"):
        write_safetensors(target, infos, lambda info: torch.zeros(3))
    assert target.read_bytes() == b"old"


def test_disk_full_is_a_clear_error_with_no_partial_file(tiny_sd1, tmp_path):
    """A file-size limit makes writes fail with EFBIG mid-file, as a full disk does with ENOSPC."""
    out = tmp_path / "pruned.safetensors"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from lora_trainer.tools.prune import prune_checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            prune_checkpoint({str(tiny_sd1.checkpoint)!r}, {str(out)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "FileWriteError" in done.stdout and str(out) in done.stdout and "the file on disk is unchanged" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_weighted_sum_and_add_difference_per_key(sd1_models, tmp_path):
    a, b, c = sd1_models
    merged = merge_checkpoints(a, b, tmp_path / "sum.safetensors", alpha=0.3, hash_inputs=False)
    out, ta, tb = (load_file(str(p)) for p in (merged.path, a, b))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.allclose(out[key], ta[key] * 0.7 + tb[key] * 0.3, atol=1e-6, rtol=0)
    for k in ta:
        if ta[k].is_floating_point():
            assert torch.allclose(out[k], torch.lerp(ta[k].float(), tb[k].float(), 0.3).to(ta[k].dtype)), k
        else:
            assert torch.equal(out[k], ta[k]), k
    assert merged.copied_from_b == ["model.only_in_b"] and torch.equal(out["model.only_in_b"], torch.ones(3))

    diff = merge_checkpoints(a, b, tmp_path / "add.safetensors", c=c, mode="add-diff", alpha=0.6,
                             hash_inputs=False)
    out, tc = load_file(str(diff.path)), load_file(str(c))
    for k in ta:
        if ta[k].is_floating_point() and k in tc:
            assert torch.allclose(out[k], ta[k] + (tb[k] - tc[k]) * 0.6, atol=1e-6), k
    missing_in_c = "first_stage_model.decoder.conv_out.bias"
    assert missing_in_c in diff.copied_from_a and torch.equal(out[missing_in_c], ta[missing_in_c])
    assert diff.left_out == ["model.only_in_b"] and "model.only_in_b" not in out


def test_per_block_alpha_follows_the_mbw_slots(sd1_models, tmp_path):
    a, b, _ = sd1_models
    slots = merge_slots("sd1")
    values = [i / 40 for i in range(26)]
    merged = merge_checkpoints(a, b, tmp_path / "blocks.safetensors", block_alpha=values, hash_inputs=False)
    out, ta, tb = (load_file(str(p)) for p in (merged.path, a, b))
    expected = {
        "model.diffusion_model.time_embed.0.weight": "IN00",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": "IN04",
        "model.diffusion_model.middle_block.1.proj_out.weight": "M00",
        "model.diffusion_model.output_blocks.11.0.out_layers.3.weight": "OUT11",
        "model.diffusion_model.out.2.weight": "OUT11",
        "first_stage_model.decoder.conv_out.weight": "BASE",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": "BASE",
    }
    for key, slot in expected.items():
        assert merge_slot(key, "sd1") == slot
        m = values[slots.index(slot)]
        assert torch.allclose(out[key], torch.lerp(ta[key], tb[key], m)), key
    assert merged.recipe["block_alpha"]["OUT11"] == values[-1]
    with pytest.raises(ValueError, match="needs 26"):
        block_alphas([0.5] * 20, "sd1")


def test_sdxl_keys_fill_the_20_slots(tiny_sdxl):
    with TensorReader(tiny_sdxl.checkpoint) as reader:
        used = {merge_slot(key, "sdxl") for key in reader.keys()}
    assert used == set(merge_slots("sdxl")) and len(merge_slots("sdxl")) == 20
    assert merge_slot("model.diffusion_model.label_emb.0.0.weight", "sdxl") == "IN00"
    assert merge_slot("model.diffusion_model.out.2.weight", "sdxl") == "OUT08"
    assert merge_slot("conditioner.embedders.1.model.ln_final.weight", "sdxl") == "BASE"
    with pytest.raises(ValueError, match="needs 20"):
        block_alphas([1.0] * 26, "sdxl")


def test_merge_metadata_keeps_a_and_adds_the_recipe(sd1_models, tmp_path):
    a, b, _ = sd1_models
    merged = merge_checkpoints(b, a, tmp_path / "m.safetensors", alpha=0.5)
    with TensorReader(merged.path) as reader:
        meta = reader.metadata
    assert meta["source"] == a.name  # B's (here the first input's) own metadata is kept
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["mode"] == "sum" and recipe["alpha"] == 0.5 and recipe["primary_model"] == b.name
    assert checkpoint_hash(a).sha256 in json.loads(meta["sd_merge_models"])


def test_merge_refuses_mismatches_and_never_touches_inputs(sd1_models, tiny_sdxl, tmp_path):
    a, b, _ = sd1_models
    before = checkpoint_hash(a).sha256
    tensors = load_file(str(b))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    tensors[key] = torch.zeros(3, 3)
    bad = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        merge_checkpoints(a, bad, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="sdxl checkpoint"):
        merge_checkpoints(a, tiny_sdxl.checkpoint, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="one of the inputs"):
        merge_checkpoints(a, b, a)
    with pytest.raises(ValueError, match="may not contain"):
        merge_checkpoints(a, b, tmp_path / "sub" / ".." / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and checkpoint_hash(a).sha256 == before


def _with_leftovers(tiny, folder: Path) -> Path:
    tensors = load_file(str(tiny.checkpoint))
    extra = {f"model_ema.{k.removeprefix('model.').replace('.', '')}": v.clone()
             for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    extra.update({"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
                  "optimizer_step": torch.tensor(5), "v_pred": torch.tensor([])})
    return _write(folder / "full.safetensors", {**tensors, **extra})


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_prune_keeps_what_the_webui_and_our_loader_read(arch, request, tmp_path):
    from lora_trainer.models.checkpoint import detect_architecture, read_state_dict
    from lora_trainer.models.loading import load_checkpoint_adapter

    tiny = request.getfixturevalue(f"tiny_{arch}")
    full = _with_leftovers(tiny, tmp_path)
    result = prune_checkpoint(full, tmp_path / "pruned.safetensors", precision="fp16")
    pruned = read_state_dict(result.path)
    original = load_file(str(tiny.checkpoint))
    assert set(pruned) == set(original) | {"v_pred"}
    assert all(k.startswith("model_ema.") or k in ("alphas_cumprod", "optimizer_step") for k in result.dropped)
    signature = {"sd1": "cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                 "sdxl": "conditioner.embedders.1.model.ln_final.weight"}[arch]
    assert signature in pruned and "model.diffusion_model.input_blocks.0.0.weight" in pruned
    assert detect_architecture(pruned) == arch
    adapter = load_checkpoint_adapter(result.path, config_dir=tiny.config_dir)
    assert adapter.architecture == arch


def test_fp16_halves_the_size(tiny_sd1, tmp_path):
    fp32 = prune_checkpoint(tiny_sd1.checkpoint, tmp_path / "fp32.safetensors", precision="fp32")
    fp16 = prune_checkpoint(tiny_sd1.checkpoint, tmp_path / "fp16.safetensors", precision="fp16")
    bf16 = prune_checkpoint(tiny_sd1.checkpoint, tmp_path / "bf16.safetensors", precision="bf16")
    print(f"fp32 {fp32.size_out} B, fp16 {fp16.size_out} B, bf16 {bf16.size_out} B")
    assert abs(fp16.size_out - bf16.size_out) < 4096  # headers differ only
    assert 0.49 < fp16.size_out / fp32.size_out < 0.51
    with TensorReader(fp16.path) as reader:
        dtypes = {info.dtype for info in reader.infos.values()}
    assert dtypes == {torch.float16, torch.int64}  # position_ids stay integers


def test_streaming_merge_peak_memory(tmp_path):
    """Peak RSS of merging two 256 MiB checkpoints in a fresh process, above its baseline after the imports
    (printed; the bound is generous: loading both files whole would need 3x a file)."""
    n = 16 * 2**20 // 4
    infos = [TensorInfo(f"model.diffusion_model.input_blocks.{i}.0.weight", torch.float32, (n,)) for i in range(1, 17)]
    infos.append(TensorInfo("model.diffusion_model.input_blocks.0.0.weight", torch.float32, (32, 4, 3, 3)))
    infos.append(TensorInfo("model.diffusion_model.x.attn2.to_k.weight", torch.float32, (32, 768)))
    for name, value in (("a", 1.0), ("b", 3.0)):
        write_safetensors(tmp_path / f"{name}.safetensors", infos, lambda info: torch.full(info.shape, value))
    script = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from lora_trainer.tools.ckpt_merge import merge_checkpoints
        folder = Path(sys.argv[1])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        merge_checkpoints(folder / "a.safetensors", folder / "b.safetensors", folder / "m.safetensors",
                          alpha=0.5, hash_inputs=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, size = int(done.stdout.split()[-1]), (tmp_path / "a.safetensors").stat().st_size
    print(f"merge of two {size / 2**20:.0f} MiB checkpoints: peak RSS growth {growth / 2**20:.0f} MiB "
          f"({growth / size:.2f}x one file)")
    assert float(load_file(str(tmp_path / "m.safetensors"))["model.diffusion_model.input_blocks.1.0.weight"][0]) == 2
    assert growth < 0.5 * size
