"""Per-epoch batches: repeats, buckets, reg balance, determinism, captions, latents and size conditioning."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data.folders import scan_dataset
from lora_trainer.data.loader import CACHE_FOLDER, TrainDataset
from lora_trainer.errors import ConfigError


@dataclass
class Cfg:
    train_data_dir: str = ""
    resolution: tuple = (64, 64)
    enable_bucket: bool = True
    min_bucket_reso: int = 32
    max_bucket_reso: int = 128
    bucket_reso_steps: int = 32
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    train_batch_size: int = 2
    prior_loss_weight: float = 1.0


def _img(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        _img(root / "2_cat" / f"sq{i}.png", (64, 64), i)
        (root / "2_cat" / f"sq{i}.txt").write_text(f"cat, tag{i}, a, b, c", encoding="utf-8")
    for i in range(2):
        _img(root / "2_cat" / f"wide{i}.png", (128, 48), 10 + i)
    _img(root / "1_dog" / "tall.png", (40, 100), 20)
    return root


def _encoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
    ).eval()
    return lambda pixels: vae.encode(pixels).latent_dist.mean


@pytest.fixture(scope="module")
def encode():
    return _encoder()


def test_epoch_has_every_image_times_repeats_in_bucket_batches(root):
    ds = TrainDataset(scan_dataset(root), Cfg(train_data_dir=str(root)), "m")
    plans = ds.epoch_batches(1, seed=42)
    counts = Counter(ds.items[i].path for p in plans for i in p.items)
    assert all(counts[item.path] == item.repeats for item in ds.items)
    assert len(ds) == sum(counts.values()) == 11 and ds.batches_per_epoch() == len(plans)
    for plan in plans:
        assert 1 <= len(plan.items) <= 2
        assert all(ds.placements[i].bucket == plan.bucket for i in plan.items)
    assert len({p.bucket for p in plans}) == 3


def test_order_is_a_pure_function_of_seed_and_epoch(root):
    cfg = Cfg(train_data_dir=str(root), flip_aug=True, shuffle_caption=True, keep_tokens=1)
    a = TrainDataset(scan_dataset(root), cfg, "m")
    b = TrainDataset(scan_dataset(root), cfg, "m")  # a "resumed" run
    assert a.epoch_batches(3, 7) == b.epoch_batches(3, 7)
    assert a.epoch_batches(3, 7) != a.epoch_batches(4, 7)
    assert a.epoch_batches(3, 7) != a.epoch_batches(3, 8)
    plans = a.epoch_batches(3, 7)
    assert a.load_batch(plans[0], 7, 3, 0).captions == b.load_batch(plans[0], 7, 3, 0).captions
    flips = [f for e in range(1, 6) for p in a.epoch_batches(e, 7) for f in p.flips]
    assert 0 < sum(flips) < len(flips)


def test_pixels_batch_and_size_conditioning(root):
    ds = TrainDataset(scan_dataset(root), Cfg(train_data_dir=str(root), train_batch_size=4), "m")
    wide = next(p for p in ds.epoch_batches(1, 0) if ds.items[p.items[0]].width == 128)
    batch = ds.load_batch(wide, 0, 1, 0)
    assert batch.latents is None
    b, (w, h) = len(wide.items), wide.bucket
    assert batch.pixels.shape == (b, 3, h, w) and batch.pixels.dtype == torch.float32
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1 and batch.pixels.std() > 0.1
    placement = ds.placements[wide.items[0]]
    top, left = placement.center_crop()
    assert batch.size_cond[0].tolist() == [48, 128, top, left, h, w]
    assert batch.loss_weights.tolist() == [1.0] * b
    assert batch.captions[0] == "cat" and batch.paths[0].endswith(".png")


def test_flipped_sample_is_mirrored_and_its_crop_measured_from_the_left(root):
    cfg = Cfg(train_data_dir=str(root), enable_bucket=False, resolution=(64, 64), train_batch_size=1, flip_aug=True)
    ds = TrainDataset(scan_dataset(root), cfg, "m")
    plans = [p for e in range(1, 4) for p in ds.epoch_batches(e, 1) if ds.items[p.items[0]].width == 128]
    flipped = next(p for p in plans if p.flips[0])
    same = next(p for p in plans if p.items == flipped.items and not p.flips[0])
    a, b = ds.load_batch(flipped, 1, 1, 0), ds.load_batch(same, 1, 1, 0)
    assert torch.equal(a.pixels, torch.flip(b.pixels, dims=[3]))
    p = ds.placements[flipped.items[0]]  # 128x48 -> resized 171x64, 64x64 window
    top, left = p.center_crop()
    assert a.size_cond[0, 3].item() == p.resized[0] - left - 64 and b.size_cond[0, 3].item() == left


def test_reg_images_balanced_and_weighted(root, tmp_path):
    _img(tmp_path / "reg" / "1_animal" / "r.png", (64, 64), 30)
    index = scan_dataset(root, reg_data_dir=str(tmp_path / "reg"))
    cfg = Cfg(train_data_dir=str(root), prior_loss_weight=0.25, train_batch_size=1)
    ds = TrainDataset(index, cfg, "m")
    plans = ds.epoch_batches(1, 0)
    reg_uses = sum(1 for p in plans for i in p.items if ds.items[i].is_reg)
    assert reg_uses == 11 and len(plans) == 22  # kohya: reg images repeated to match train images x repeats
    reg_plan = next(p for p in plans if ds.items[p.items[0]].is_reg)
    assert ds.load_batch(reg_plan, 0, 1, 0).loss_weights.tolist() == [0.25]


def test_on_the_fly_and_cached_latents_agree(root, encode):
    cfg = Cfg(train_data_dir=str(root), flip_aug=True)
    live = TrainDataset(scan_dataset(root), cfg, "m", encode_images=encode)
    cached = TrainDataset(scan_dataset(root), Cfg(train_data_dir=str(root), flip_aug=True, cache_latents=True), "m",
                          encode_images=encode)
    report = cached.cache_latents(batch_size=4)
    assert report.encoded == 2 * 6 and len(cached.cache) == 12  # both flips of every image
    plan = next(p for p in cached.epoch_batches(1, 5) if len(p.items) == 2)
    a, b = live.load_batch(plan, 5, 1, 0), cached.load_batch(plan, 5, 1, 0)
    w, h = plan.bucket
    assert a.latents.shape == (2, 4, h // 8, w // 8) and a.pixels is None
    assert torch.allclose(a.latents, b.latents, atol=1e-5)


def test_disk_cache_goes_to_a_hidden_folder_the_scanner_ignores(root, encode):
    cfg = Cfg(train_data_dir=str(root), cache_latents_to_disk=True)
    TrainDataset(scan_dataset(root), cfg, "m", encode_images=encode).cache_latents(batch_size=8)
    assert len(os.listdir(root / CACHE_FOLDER)) == 6
    assert not any(CACHE_FOLDER in p for p in scan_dataset(root).problems)
    # a new run with the same model reads the latents without an encoder
    ds = TrainDataset(scan_dataset(root), cfg, "m")
    assert ds.load_batch(ds.epoch_batches(1, 0)[0], 0, 1, 0).latents is not None
    other = TrainDataset(scan_dataset(root), cfg, "another-vae")
    with pytest.raises(ConfigError, match="no cached latent"):
        other.load_batch(other.epoch_batches(1, 0)[0], 0, 1, 0)


def test_random_crop_with_cache_is_refused(root):
    with pytest.raises(ConfigError, match="random_crop.*cache_latents"):
        TrainDataset(scan_dataset(root), Cfg(random_crop=True, cache_latents=True), "m")


def test_random_crop_varies_per_epoch(root):
    ds = TrainDataset(scan_dataset(root), Cfg(random_crop=True, enable_bucket=False), "m")
    crops = {c for e in range(1, 8) for p in ds.epoch_batches(e, 0) for i, c in zip(p.items, p.crops)
             if ds.items[i].width == 128}
    assert len(crops) > 2 and all(c[0] == 0 for c in crops)


def test_fixed_captions_and_bucket_info(root):
    ds = TrainDataset(scan_dataset(root), Cfg(), "m")
    assert ds.fixed_captions() == sorted({"cat", "dog"} | {f"cat, tag{i}, a, b, c" for i in range(3)})
    assert TrainDataset(scan_dataset(root), Cfg(shuffle_caption=True), "m").fixed_captions() is None
    info = ds.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 11
    assert TrainDataset(scan_dataset(root), Cfg(enable_bucket=False), "m").bucket_info() is None


def test_caption_dropout_every_n_epochs_in_batches(root):
    cfg = Cfg(train_batch_size=8)
    cfg.caption_dropout_every_n_epochs = 2
    ds = TrainDataset(scan_dataset(root), cfg, "m")
    assert all(c for c in ds.load_batch(ds.epoch_batches(1, 0)[0], 0, 1, 0).captions)
    assert all(c == "" for c in ds.load_batch(ds.epoch_batches(2, 0)[0], 0, 2, 0).captions)


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches_matches_load_batch_and_resumes_mid_epoch(root, workers):
    cfg = Cfg(train_data_dir=str(root), flip_aug=True, shuffle_caption=True)
    ds = TrainDataset(scan_dataset(root), cfg, "m")
    plans = ds.epoch_batches(2, 9)
    got = list(ds.iter_batches(2, 9, start=1, workers=workers))
    assert [i for i, _ in got] == list(range(1, len(plans)))
    for index, batch in got:
        expected = ds.load_batch(plans[index], 9, 2, index)
        assert batch.paths == expected.paths and batch.captions == expected.captions
        assert torch.equal(batch.pixels, expected.pixels) and torch.equal(batch.size_cond, expected.size_cond)


def test_iter_batches_encodes_in_the_calling_thread(root, encode):
    import threading

    threads = set()

    def tracking(pixels):
        threads.add(threading.get_ident())
        return encode(pixels)

    cfg = Cfg(train_data_dir=str(root))
    cfg.max_data_loader_n_workers = 2
    ds = TrainDataset(scan_dataset(root), cfg, "m", encode_images=tracking)
    batches = [b for _, b in ds.iter_batches(1, 0)]
    assert all(b.latents is not None and b.pixels is None for b in batches)
    assert threads == {threading.get_ident()}


def test_real_dataset_config(root):
    from lora_trainer.config.schema import DatasetConfig

    cfg = DatasetConfig(train_data_dir=str(root), resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                        max_bucket_reso=128, bucket_reso_steps=32, shuffle_caption=True, keep_tokens=1,
                        train_batch_size=3, prior_loss_weight=0.5)
    ds = TrainDataset(scan_dataset(cfg), cfg, "m")
    assert ds.caption_options.shuffle_caption and ds.caption_options.keep_tokens == 1
    assert ds.bucket_settings.bucket_reso_steps == 32 and ds.batch_size == 3 and ds.prior_loss_weight == 0.5
    assert len(ds) == 11 and ds.fixed_captions() is None


def test_two_processes_share_the_global_batches_of_one_process_at_twice_the_batch(root):
    from lora_trainer.train.distributed import process_share

    cfg = Cfg(train_data_dir=str(root), train_batch_size=2, shuffle_caption=True, caption_tag_dropout_rate=0.3,
              flip_aug=True)
    parallel = TrainDataset(scan_dataset(root), cfg, "m")
    parallel.processes = 2
    alone = TrainDataset(scan_dataset(root), Cfg(**{**cfg.__dict__, "train_batch_size": 4}), "m")
    assert parallel.epoch_batches(2, 5) == alone.epoch_batches(2, 5)
    assert parallel.batches_per_epoch() == alone.batches_per_epoch() < TrainDataset(scan_dataset(root), cfg,
                                                                                    "m").batches_per_epoch()
    for index, plan in enumerate(parallel.epoch_batches(2, 5)):
        whole = alone.load_batch(plan, 5, 2, index)
        shares = [process_share(len(plan.items), rank, 2) for rank in (0, 1)]
        parts = [parallel.load_batch(plan, 5, 2, index, share) for share in shares if share.stop > share.start]
        assert [c for p in parts for c in p.captions] == whole.captions
        assert [path for p in parts for path in p.paths] == whole.paths
        assert torch.equal(torch.cat([p.pixels for p in parts]), whole.pixels)
        assert torch.equal(torch.cat([p.size_cond for p in parts]), whole.size_cond)
