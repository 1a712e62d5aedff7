"""Latent cache keys, RAM and disk storage, and the text-encoder output cache, with a tiny real VAE."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data.buckets import Bucketer, BucketSettings
from lora_trainer.data.cache import LatentCache, LatentRequest, TextEncoderCache, latent_key, request_pixels
from lora_trainer.models.adapter import TextConditioning
from lora_trainer.progress import CancelToken


class CountingEncoder:
    """A tiny real diffusers VAE encoder that counts the images it encodes."""

    def __init__(self):
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        self.vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
        ).eval()
        self.images = 0
        self.calls = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        self.calls += 1
        return self.vae.encode(pixels).latent_dist.mean * 0.18215


@pytest.fixture(scope="module")
def encoder():
    return CountingEncoder()


def _image(path, seed=0, size=(48, 32)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def _request(path, flip=False, resolution=32):
    placement = Bucketer(BucketSettings(resolution=resolution)).place(*Image.open(path).size)
    return LatentRequest(str(path), placement, placement.center_crop(), flip)


def test_key_changes_with_every_part():
    base = latent_key("ab", (64, 32), (0, 8), False, "m1")
    others = [
        latent_key("ac", (64, 32), (0, 8), False, "m1"), latent_key("ab", (32, 64), (0, 8), False, "m1"),
        latent_key("ab", (64, 32), (0, 9), False, "m1"), latent_key("ab", (64, 32), (0, 8), True, "m1"),
        latent_key("ab", (64, 32), (0, 8), False, "m2"),
    ]
    assert len({base, *others}) == 6
    assert base == latent_key("ab", (64, 32), (0, 8), False, "m1")


def test_ram_cache_encodes_once_in_batches(tmp_path, encoder):
    paths = [_image(tmp_path / f"{i}.png", i) for i in range(3)]
    requests = [_request(p) for p in paths] + [_request(_image(tmp_path / "tall.png", 9, (32, 48)), resolution=16)]
    cache = LatentCache("vae-a")
    seen = []
    before_images, before_calls = encoder.images, encoder.calls
    report = cache.cache_all(requests + requests[:1], encoder, batch_size=2, progress=seen.append)
    assert (report.encoded, report.in_memory, report.from_disk) == (4, 0, 0)
    assert encoder.images - before_images == 4
    assert encoder.calls - before_calls == 3  # 3 images of one bucket in 2 batches, 1 of the other bucket
    assert seen[-1].done == 4 and seen[-1].total == 4
    latent = cache.get(requests[0])
    assert latent.shape == (4, 4, 4) and latent.device.type == "cpu"
    with torch.no_grad():
        direct = encoder(request_pixels(requests[0])[None])[0]
    assert torch.allclose(latent, direct, atol=1e-6)
    again = cache.cache_all(requests, encoder)
    assert (again.encoded, again.in_memory) == (0, 4)


def test_disk_cache_survives_and_is_never_stale(tmp_path, encoder):
    path = _image(tmp_path / "a.png", 1)
    cache_dir = tmp_path / "cache"
    request = _request(path)
    LatentCache("vae-a", cache_dir).cache_all([request], encoder)
    assert len(os.listdir(cache_dir)) == 1
    fresh = LatentCache("vae-a", cache_dir)
    before = encoder.images
    assert fresh.cache_all([request], encoder).from_disk == 1 and encoder.images == before
    old = fresh.get(request)
    # another VAE: miss
    assert LatentCache("vae-b", cache_dir).get(request) is None
    # another bucket size: miss
    assert LatentCache("vae-a", cache_dir).get(_request(path, resolution=16)) is None
    # a flipped image is its own entry, and its latent differs
    flipped = _request(path, flip=True)
    assert fresh.get(flipped) is None
    fresh.cache_all([flipped], encoder)
    assert not torch.allclose(fresh.get(flipped), old)
    # the image changes on disk (same size, same name): the old entry must not be used
    _image(tmp_path / "a.png", 2)
    report = LatentCache("vae-a", cache_dir).cache_all([request], encoder)
    assert report.encoded == 1
    assert not torch.allclose(LatentCache("vae-a", cache_dir).get(request), old)


def test_corrupt_disk_entry_is_encoded_again(tmp_path, encoder):
    path = _image(tmp_path / "a.png", 3)
    cache_dir = tmp_path / "cache"
    LatentCache("m", cache_dir).cache_all([_request(path)], encoder)
    (entry,) = os.listdir(cache_dir)
    (cache_dir / entry).write_bytes(b"garbage")
    assert LatentCache("m", cache_dir).cache_all([_request(path)], encoder).encoded == 1


def test_cancel_stops_between_batches(tmp_path, encoder):
    requests = [_request(_image(tmp_path / f"{i}.png", i)) for i in range(3)]
    token = CancelToken()
    cache = LatentCache("m")
    report = cache.cache_all(requests, encoder, progress=lambda info: token.cancel(), cancel=token)
    assert report.cancelled and report.encoded == 1 and len(cache) == 1


def test_text_encoder_cache():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        rows = torch.stack([torch.full((3, 2), float(len(c))) for c in captions])
        return TextConditioning(rows, torch.arange(len(captions), dtype=torch.float32)[:, None] + len(captions[0]))

    cache = TextEncoderCache()
    assert cache.encode_all(["a", "bbb", "a", "cc"], encode, batch_size=2) == 3
    assert calls == [["a", "bbb"], ["cc"]]
    cond = cache.get(["cc", "a", "cc"])
    assert cond.crossattn.shape == (3, 3, 2)
    assert cond.crossattn[:, 0, 0].tolist() == [2.0, 1.0, 2.0]
    assert cond.pooled.shape == (3, 1)
    assert cache.encode_all(["a"], encode) == 0 and len(calls) == 2
    with pytest.raises(KeyError, match="zzz.*encode_all"):
        cache.get(["zzz"])
