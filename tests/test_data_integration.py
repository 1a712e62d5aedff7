"""The data package against a real (tiny) SD1 model adapter: latents and text-encoder outputs through the cache."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data import TextEncoderCache, TrainDataset, scan_dataset


@dataclass
class Cfg:
    train_data_dir: str
    resolution: tuple = (64, 64)
    enable_bucket: bool = True
    min_bucket_reso: int = 32
    max_bucket_reso: int = 128
    bucket_reso_steps: int = 32
    cache_latents: bool = True
    cache_latents_to_disk: bool = True
    flip_aug: bool = True
    train_batch_size: int = 2


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir, device=torch.device("cpu"),
                                   dtype=torch.float32)


def test_latents_and_text_cache_with_a_real_adapter(tmp_path, adapter):
    root = tmp_path / "train"
    (root / "3_sks").mkdir(parents=True)
    for i, size in enumerate([(64, 64), (64, 64), (96, 48)]):
        arr = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "3_sks" / f"{i}.png")
        (root / "3_sks" / f"{i}.txt").write_text(f"sks, tag{i}", encoding="utf-8")
    ds = TrainDataset(scan_dataset(root), Cfg(str(root)), adapter.model_id, adapter.encode_images)
    torch.manual_seed(0)
    assert ds.cache_latents(batch_size=4).encoded == 6
    plans = ds.epoch_batches(1, seed=3)
    assert sum(len(p.items) for p in plans) == 9
    plan = next(p for p in plans if len(p.items) == 2)
    batch = ds.load_batch(plan, 3, 1, 0)
    w, h = plan.bucket
    assert batch.latents.shape == (2, 4, h // 8, w // 8) and torch.isfinite(batch.latents).all()

    captions = ds.fixed_captions()
    assert captions == ["sks, tag0", "sks, tag1", "sks, tag2"]
    text = TextEncoderCache()
    text.encode_all(captions, lambda c: adapter.encode_captions(c, 1, 75))
    cond = text.get(batch.captions)
    assert cond.crossattn.shape[:2] == (2, 77) and cond.crossattn.device.type == "cpu"
    with torch.no_grad():
        direct = adapter.encode_captions(batch.captions, 1, 75)
    assert torch.allclose(cond.crossattn, direct.crossattn, atol=1e-5)

    # a second run over the same files reuses the disk cache without any encoder
    again = TrainDataset(scan_dataset(root), Cfg(str(root)), adapter.model_id)
    assert torch.equal(again.load_batch(plan, 3, 1, 0).latents, batch.latents)
