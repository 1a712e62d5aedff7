"""LoRA file tools on files built from tiny real-architecture models: block weights, merges, resize, inspect."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from lora_trainer.errors import NetworkError
from lora_trainer.testing.lora_files import random_lora, tiny_targets
from lora_trainer.tools import (
    MergeInput, apply_block_weights, expand_vector, inspect_lora, merge_loras, read_lora, resize_lora, slot_of,
)


@pytest.fixture(scope="module")
def sd1_files(tiny_sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("tool_loras")
    plain, conv = tiny_targets(tiny_sd1), tiny_targets(tiny_sd1, include_conv=True)
    return {
        "a": random_lora(plain, root / "a.safetensors", dim=4, alpha=2.0, seed=1),
        "b": random_lora(plain, root / "b.safetensors", dim=2, alpha=1.0, seed=2),
        "locon": random_lora(conv, root / "locon.safetensors", dim=4, alpha=1.0, conv_dim=2, conv_alpha=1.0, seed=3),
        "loha": random_lora(conv, root / "loha.safetensors", algo="loha", dim=2, alpha=1.0, conv_dim=2, seed=4),
    }


def _deltas(path):
    lora = read_lora(path)
    return {name: lora.delta(name) for name in lora.modules}


def _assert_keys_ok(path):
    report = inspect_lora(path)
    assert report.keys_ok, report.unmatched[:3]


def _vector26(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = (torch.rand(26, generator=g) * 2 - 0.5).tolist()
    values[5] = 0.0  # IN04 dropped entirely
    return values


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_block_weights_in_the_file_equal_block_weights_at_load_time(sd1_files, tmp_path, kind):
    src = sd1_files[kind]
    before = src.read_bytes()
    weights = expand_vector(_vector26(), "sd1")
    result = apply_block_weights(read_lora(src), weights, tmp_path / "w.safetensors")
    original, weighted = _deltas(src), _deltas(result.path)
    for name, delta in original.items():
        w = weights.weight(name)
        if w == 0:
            assert name not in weighted and slot_of(name) == "IN04"
            continue
        torch.testing.assert_close(weighted[name], delta * w, rtol=1e-5, atol=1e-6)
    assert src.read_bytes() == before
    meta = read_lora(result.path).metadata
    assert weights.text() in meta["lora_trainer_block_weights"] and src.name in meta["lora_trainer_block_weights"]
    _assert_keys_ok(result.path)


def test_exact_merge_is_the_weighted_sum_with_block_and_negative_ratios(sd1_files, tmp_path):
    a, b = read_lora(sd1_files["a"]), read_lora(sd1_files["b"])
    outd = expand_vector([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0], "sd1")
    result = merge_loras([MergeInput(a, 0.7, outd), MergeInput(b, -0.4)], tmp_path / "m.safetensors")
    merged = read_lora(result.path)
    for name in a.modules:
        expected = a.delta(name) * 0.7 * outd.weight(name) + b.delta(name) * -0.4
        torch.testing.assert_close(merged.delta(name), expected, rtol=1e-5, atol=1e-6)
        module = merged.modules[name]
        assert module.alpha == module.rank == 6 or outd.weight(name) == 0
    assert result.report.overall == pytest.approx(1.0, abs=1e-6)
    assert result.report.worst[1] < 1e-5
    _assert_keys_ok(result.path)


def test_svd_merge_rank_cap_report_and_full_rank(sd1_files, tmp_path):
    a, b = read_lora(sd1_files["a"]), read_lora(sd1_files["b"])
    inputs = [MergeInput(a, 1.0), MergeInput(b, 0.5)]
    low = merge_loras(inputs, tmp_path / "r2.safetensors", rank=2)
    merged = read_lora(low.path)
    for name, module in merged.modules.items():
        exact = a.delta(name) + 0.5 * b.delta(name)
        s = torch.linalg.svd(exact.reshape(exact.shape[0], -1).double())[1]
        assert module.rank == 2
        kept = torch.sqrt((s[:2] ** 2).sum() / (s ** 2).sum()).item()
        assert low.report.modules[name].retained == pytest.approx(kept, abs=1e-5)
        err = (merged.delta(name) - exact).norm() / exact.norm()
        assert low.report.modules[name].relative_error == pytest.approx(err.item(), abs=1e-4)
    full = merge_loras(inputs, tmp_path / "full.safetensors", rank=10_000)
    merged = read_lora(full.path)
    for name, module in merged.modules.items():
        shape = module.shape
        assert module.rank <= min(6, shape[0], torch.Size(shape[1:]).numel())  # capped at the layer and sum of ranks
        torch.testing.assert_close(merged.delta(name), a.delta(name) + 0.5 * b.delta(name), rtol=1e-4, atol=1e-5)
    assert full.report.overall == pytest.approx(1.0, abs=1e-6)


def test_loha_merges_by_svd_and_not_exactly(sd1_files, tmp_path):
    loha, locon = read_lora(sd1_files["loha"]), read_lora(sd1_files["locon"])
    with pytest.raises(NetworkError, match="not LoRA/LoCon.*--rank"):
        merge_loras([MergeInput(loha)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    result = merge_loras([MergeInput(loha, 1.0), MergeInput(locon, 1.0)], tmp_path / "y.safetensors", rank=64,
                         conv_rank=64)
    merged = read_lora(result.path)
    name = next(n for n, m in loha.modules.items() if m.is_conv and m.kernel == (3, 3))
    torch.testing.assert_close(merged.delta(name), loha.delta(name) + locon.delta(name), rtol=1e-4, atol=1e-5)
    _assert_keys_ok(result.path)


def test_resize_fixed_and_dynamic_keep_strength(sd1_files, tmp_path):
    src = read_lora(sd1_files["locon"])
    fixed = resize_lora(src, tmp_path / "r2.safetensors", rank=2)
    small = read_lora(fixed.path)
    for name, module in small.modules.items():
        exact = src.delta(name)
        u, s, vh = torch.linalg.svd(exact.reshape(exact.shape[0], -1).double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(module.delta().double().reshape(best.shape), best, rtol=1e-4, atol=1e-5)
        assert module.scale == pytest.approx(src.modules[name].scale)  # alpha rescaled with the rank
    dynamic = resize_lora(src, tmp_path / "fro.safetensors", dynamic="sv_fro:0.9")
    for name, (_, kept) in dynamic.ranks.items():
        exact = src.delta(name)
        s = torch.linalg.svd(exact.reshape(exact.shape[0], -1).double())[1]
        share = torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum())
        assert kept == int((share < 0.9 - 1e-9).sum()) + 1  # the fewest values reaching 0.9, no extra one
    full = resize_lora(src, tmp_path / "same.safetensors", rank=64)
    for name, module in read_lora(full.path).modules.items():
        torch.testing.assert_close(module.delta(), src.delta(name), rtol=1e-4, atol=1e-5)


def test_null_layer_resizes_to_rank_one(sd1_files, tmp_path):
    sd, meta = safetensors.torch.load_file(sd1_files["a"]), {"ss_base_model_version": "sd_v1"}
    name = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[name] = torch.zeros_like(sd[name])
    path = tmp_path / "null.safetensors"
    safetensors.torch.save_file(sd, path, meta)
    result = resize_lora(read_lora(path), tmp_path / "null_r.safetensors", dynamic="sv_ratio:10")
    assert result.ranks[name.split(".")[0]][1] == 1


def test_bad_inputs_give_clear_errors_and_no_output(sd1_files, tmp_path, tiny_sdxl):
    a = read_lora(sd1_files["a"])
    with pytest.raises(ValueError, match="output is one of the inputs"):
        merge_loras([MergeInput(a)], sd1_files["a"])
    with pytest.raises(ValueError, match=r"'\.\.'"):
        resize_lora(a, tmp_path / ".." / "x.safetensors", rank=2)
    xl = random_lora(tiny_targets(tiny_sdxl), tmp_path / "xl.safetensors", architecture="sdxl")
    with pytest.raises(NetworkError, match="sdxl LoRA cannot be merged"):
        merge_loras([MergeInput(a), MergeInput(read_lora(xl))], tmp_path / "mix.safetensors")
    sd = safetensors.torch.load_file(sd1_files["b"])
    first = next(k.split(".")[0] for k in sd)
    dora = tmp_path / "dora.safetensors"
    safetensors.torch.save_file({**sd, f"{first}.dora_scale": torch.ones(1, 8)}, dora)
    with pytest.raises(NetworkError, match="DoRA.*" + first):
        merge_loras([MergeInput(read_lora(dora))], tmp_path / "d.safetensors")
    assert read_lora(dora).dora_modules == [first]
    oft = tmp_path / "oft.safetensors"
    safetensors.torch.save_file({f"{first}.oft_blocks": torch.ones(2, 2, 2)}, oft)
    with pytest.raises(NetworkError, match="OFT"):
        read_lora(oft)
    pickled = tmp_path / "evil.pt"
    torch.save({"x": object()}, pickled)
    with pytest.raises(NetworkError, match="weights-only"):
        read_lora(pickled)
    with pytest.raises(ValueError, match="12 or 20"):
        expand_vector([1] * 17, read_lora(xl).architecture)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora.safetensors", "evil.pt", "oft.safetensors",
                                                          "xl.safetensors"]


def test_failed_write_leaves_no_partial_file(sd1_files, tmp_path, monkeypatch):
    a = read_lora(sd1_files["a"])

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        merge_loras([MergeInput(a)], tmp_path / "full.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_inspect_reports_architecture_ranks_blocks_and_key_check(sd1_files, tmp_path):
    report = inspect_lora(sd1_files["locon"])
    assert (report.architecture, report.algorithm) == ("sd1", "locon")
    assert report.conv_modules > 0 and report.te_modules == 72 and report.keys_ok
    assert set(report.ranks.values()) == {2, 4} and "M00" in report.by_block
    assert report.metadata["ss_base_model_version"] == "sd_v1"
    sd = safetensors.torch.load_file(sd1_files["b"])
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.ones(2, 4)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.ones(4, 2)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(sd, bad)
    assert inspect_lora(bad).unmatched == ["lora_unet_not_a_layer"]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_trainer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_commands(sd1_files, tmp_path, capsys):
    from lora_trainer.__main__ import main

    merged = tmp_path / "m.safetensors"
    done = _cli("merge", f"{sd1_files['a']}:0.7", f"{sd1_files['b']}:-0.4", "--out", merged)  # the real entry point
    assert done.returncode == 0, done.stdout + done.stderr
    assert "retained (Frobenius) overall: 1.000000" in done.stdout
    assert main(["lbw", str(sd1_files["a"]), "--weights", "OUTD", "--out", str(tmp_path / "o.safetensors")]) == 0
    assert "OUT03" in capsys.readouterr().out
    assert main(["resize", str(merged), "--dynamic", "sv_fro:0.9", "--rank", "4", "--out",
                 str(tmp_path / "r.safetensors")]) == 0
    assert "largest relative error" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "r.safetensors"), "--json"]) == 0
    assert '"keys_ok": true' in capsys.readouterr().out
    assert main(["lbw", str(sd1_files["a"]), "--weights", "1,0,1", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "17 or 26" in capsys.readouterr().out
    assert not (tmp_path / "bad.safetensors").exists()
