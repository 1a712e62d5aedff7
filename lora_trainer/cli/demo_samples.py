"""The demo's evidence: samples at several LoRA strengths, their distance to the training images, a labelled grid.

A LoRA that learned its dataset pulls samples toward the training images as its strength goes from 0 (the base
model) to 1. The distance of a sample is the mean absolute pixel difference (0-255) to the nearest training image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STRENGTHS = (0.0, 0.5, 1.0)
CELL_SCALE = 4  # 64 px samples are shown 4x larger (pixel-exact) so the labels fit and the blocks are visible


@dataclass(frozen=True)
class StrengthSamples:
    """Samples of one LoRA at several strengths.

    Attributes:
        strengths (tuple[float, ...]): the strengths sampled.
        prompts (list[str]): the prompts.
        seeds (list[int]): the noise seeds; every (strength, prompt) pair is sampled with each.
        images (dict[tuple[int, int], PIL.Image.Image]): (strength index, prompt index) -> the first seed's image.
        distances (dict[float, float]): strength -> mean distance of its samples to the nearest training image.
    """

    strengths: tuple[float, ...]
    prompts: list[str]
    seeds: list[int]
    images: dict[tuple[int, int], Image.Image]
    distances: dict[float, float]


def nearest_distance(image: Image.Image, references: np.ndarray) -> float:
    """Mean absolute pixel difference (0-255) between an image and the closest of `references` `[N,H,W,3]`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return float(np.abs(references - pixels).mean(axis=(1, 2, 3)).min())


def load_references(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """The training images as `[N,H,W,3]` float32 at the samples' size (width, height)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize(size), dtype=np.float32) for p in paths])


def sample_strengths(adapter, network, prompts: list[str], seeds: list[int], references: np.ndarray,
                     settings, strengths: tuple[float, ...] = STRENGTHS) -> StrengthSamples:
    """Sample every prompt with every seed at each strength and measure the distance to the training images.

    Args:
        adapter (ModelAdapter): the model, with `network` applied.
        network (LoRANetwork): its `multiplier` is set to each strength (and back to 1 at the end).
        prompts (list[str]): the prompts.
        seeds (list[int]): noise seeds (the same ones at every strength, so only the LoRA differs).
        references (numpy.ndarray): the training images, `load_references`.
        settings (SampleSettings): size, steps, guidance.
        strengths (tuple[float, ...], optional): defaults to 0, 0.5, 1.

    Returns:
        StrengthSamples: the first seed's images and the mean distance per strength.
    """
    from lora_trainer.models.sampling import sample_images

    images, distances = {}, {}
    for s_index, strength in enumerate(strengths):
        network.multiplier = strength
        found = []
        for seed in seeds:
            for p_index, image in enumerate(sample_images(adapter, prompts, seed=seed, settings=settings)):
                found.append(nearest_distance(image, references))
                images.setdefault((s_index, p_index), image)
        distances[strength] = float(np.mean(found))
    network.multiplier = 1.0
    return StrengthSamples(tuple(strengths), list(prompts), list(seeds), images, distances)


def labelled_grid(samples: StrengthSamples, reference: Image.Image) -> Image.Image:
    """Columns: each strength, then a training image; rows: the prompts; labels as in the WebUI's X/Y plot.

    Args:
        samples (StrengthSamples): from `sample_strengths`.
        reference (PIL.Image.Image): a training image, shown beside each row.

    Returns:
        PIL.Image.Image: the grid, cells enlarged `CELL_SCALE` times (nearest neighbour).
    """
    from lora_trainer.grids.image import draw_labelled_grid

    first = samples.images[(0, 0)]
    size = (first.width * CELL_SCALE, first.height * CELL_SCALE)
    cells = {}
    for (s_index, p_index), image in samples.images.items():
        cells[(s_index, p_index, 0)] = image.resize(size, Image.NEAREST)
    for p_index in range(len(samples.prompts)):
        cells[(len(samples.strengths), p_index, 0)] = reference.convert("RGB").resize(size, Image.NEAREST)
    labels = [f"LoRA strength {strength:g}" for strength in samples.strengths] + ["a training image"]
    return draw_labelled_grid(cells, labels, list(samples.prompts), [""])


__all__ = ["STRENGTHS", "StrengthSamples", "labelled_grid", "load_references", "nearest_distance",
           "sample_strengths"]
