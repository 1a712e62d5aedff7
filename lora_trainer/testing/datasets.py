"""Small synthetic captioned datasets in kohya's folder layout, for tests, benchmarks and the demo."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw


def write_square_dataset(root: str | Path, folder: str = "1_square", count: int = 4, size: int = 64,
                         caption: str = "square, red, item{i}", background=(30, 60, 200), fill=(220, 30, 30),
                         seed: int = 0) -> Path:
    """Write `count` images of a filled square at random places on a plain background, with captions.

    Args:
        root (str | Path): the train_data_dir to create.
        folder (str, optional): the `<repeats>_<concept>` folder, defaults to "1_square".
        count (int, optional): images, defaults to 4.
        size (int, optional): image side in pixels, defaults to 64.
        caption (str, optional): caption template; `{i}` is the image index.
        background (tuple, optional): RGB background.
        fill (tuple, optional): RGB of the square.
        seed (int, optional): placement seed, defaults to 0.

    Returns:
        Path: `root`.
    """
    root = Path(root)
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image = Image.new("RGB", (size, size), background)
        side = size // 2 - size // 16
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=fill)
        image.save(target / f"{i:03d}.png")
        (target / f"{i:03d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return root
