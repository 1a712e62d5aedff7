"""Aspect-ratio buckets with kohya's rules, and the resize/crop into a bucket."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.buckets import (
    Bucketer, BucketSettings, bucket_info, fit_to_bucket, make_bucket_resolutions, parse_resolution,
)
from lora_trainer.errors import ConfigError


def test_bucket_resolutions_follow_kohya_rules():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (448, 576) in resos and (576, 448) in resos
    assert (320, 768) in resos and (256, 1024) in resos and (1024, 256) in resos
    for w, h in resos:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
    assert resos == sorted(set(resos))
    sdxl = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1216, 832) in sdxl


@pytest.mark.parametrize("size", [(1000, 500), (500, 1000), (640, 480), (300, 300), (37, 1200)])
def test_each_image_goes_to_the_closest_aspect_ratio(size):
    bucketer = Bucketer(BucketSettings(resolution=(512, 512), enable_bucket=True))
    p = bucketer.place(*size)
    ar = size[0] / size[1]
    best = min(abs(w / h - ar) for w, h in bucketer.resos)
    assert abs(abs(p.ar_error) - best) < 1e-9
    assert p.bucket in bucketer.resos
    # resized covers the bucket and touches it on one side (resize-to-cover, then crop)
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
    assert p.resized[0] == p.bucket[0] or p.resized[1] == p.bucket[1]


def test_exact_bucket_size_is_kept():
    p = Bucketer(BucketSettings(resolution=512, enable_bucket=True)).place(448, 576)
    assert p.bucket == (448, 576) and p.resized == (448, 576) and p.center_crop() == (0, 0)


def test_no_upscale_uses_the_image_size_rounded_down():
    bucketer = Bucketer(BucketSettings(resolution=512, enable_bucket=True, bucket_no_upscale=True))
    p = bucketer.place(300, 200)
    assert p.bucket == (256, 192) and p.resized == (300, 200)
    big = bucketer.place(2000, 1000)
    assert big.bucket[0] * big.bucket[1] <= 512 * 512
    assert big.bucket[0] % 64 == 0 and big.bucket[1] % 64 == 0
    assert big.resized[0] >= big.bucket[0] and big.resized[1] >= big.bucket[1]
    assert abs(big.resized[0] / big.resized[1] - 2.0) < 0.02
    tiny = bucketer.place(40, 30)  # below one step: upscaled to the smallest bucket
    assert tiny.bucket == (64, 64) and tiny.resized[0] >= 64 and tiny.resized[1] >= 64


def test_without_buckets_every_image_gets_the_resolution():
    bucketer = Bucketer(BucketSettings(resolution=(64, 32), enable_bucket=False))
    for size in [(100, 50), (10, 40), (640, 320)]:
        p = bucketer.place(*size)
        assert p.bucket == (64, 32)
        assert p.resized[0] >= 64 and p.resized[1] >= 32
    assert bucketer.place(10, 40).resized == (64, 256)


def _gradient(w, h):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) * 4)[None, :]
    arr[:, :, 1] = (np.arange(h) * 4)[:, None]
    return Image.fromarray(arr)


def test_center_crop_and_flip():
    p = Bucketer(BucketSettings(resolution=32)).place(64, 32)
    assert p.bucket == (32, 32) and p.resized == (64, 32) and p.center_crop() == (0, 16)
    out = np.asarray(fit_to_bucket(_gradient(64, 32), p, p.center_crop()))
    assert out.shape == (32, 32, 3) and out[0, 0, 0] == 16 * 4 and out[0, -1, 0] == 47 * 4
    flipped = np.asarray(fit_to_bucket(_gradient(64, 32), p, p.center_crop(), flip=True))
    assert flipped[0, 0, 0] == 47 * 4 and flipped[0, -1, 0] == 16 * 4


def test_random_crop_stays_inside_and_varies():
    p = Bucketer(BucketSettings(resolution=32)).place(32, 64)
    crops = {p.random_crop(random.Random(s)) for s in range(30)}
    assert all(0 <= top <= 32 and left == 0 for top, left in crops) and len(crops) > 5
    top, left = 5, 0
    out = np.asarray(fit_to_bucket(_gradient(32, 64), p, (top, left)))
    assert out[0, 0, 1] == top * 4


def test_bucket_info_counts_repeats():
    bucketer = Bucketer(BucketSettings(resolution=512, enable_bucket=True))
    places = [bucketer.place(512, 512), bucketer.place(500, 500), bucketer.place(1000, 500)]
    info = bucket_info(places, [10, 2, 3])
    counts = {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()}
    assert counts == {(512, 512): 12, places[2].bucket: 3}
    assert list(info["buckets"]) == [0, 1]
    assert info["mean_img_ar_error"] == pytest.approx(abs(places[2].ar_error) / 3)


def test_settings_from_config_and_errors():
    cfg = SimpleNamespace(resolution="768,1024", enable_bucket=True, min_bucket_reso=None, bucket_reso_steps=32)
    s = BucketSettings.from_config(cfg)
    assert s.resolution == (768, 1024) and s.min_bucket_reso == 256 and s.bucket_reso_steps == 32
    assert parse_resolution(512) == (512, 512) and parse_resolution([640, 512]) == (640, 512)
    with pytest.raises(ConfigError, match="resolution"):
        parse_resolution("big")
    with pytest.raises(ConfigError, match="bucket_reso_steps"):
        BucketSettings(bucket_reso_steps=60)
    with pytest.raises(ConfigError, match="min_bucket_reso"):
        BucketSettings(min_bucket_reso=1024, max_bucket_reso=512)
