"""The labelled grid image and its PNG text.

The layout follows the WebUI's X/Y/Z plot: column labels in a strip above the images, row labels in a strip to
their left (three quarters of an image wide), each sub-grid (z) titled above; black text on white, wrapped to the
cell, font size from the cell size.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lora_trainer.atomic_io import atomic_write_bytes

PNG_PARAMETERS_KEY = "parameters"        # the WebUI's infotext key: PNG Info and "send to txt2img" read it
PNG_GRID_KEY = "lora_trainer_grid"       # our settings and axes as JSON
_SUBGRID_MARGIN = 0


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _text_block(draw, lines: list[str], font, spacing: int) -> tuple[int, int]:
    heights = [draw.textbbox((0, 0), line or " ", font=font)[3] for line in lines]
    return max(draw.textlength(line, font=font) for line in lines), sum(heights) + spacing * (len(lines) - 1)


def annotate(grid: Image.Image, cell_w: int, cell_h: int, column_labels: list[str],
             row_labels: list[str]) -> Image.Image:
    """Add a label strip above the columns and one left of the rows (a strip whose labels are all empty is left
    out).

    Args:
        grid (PIL.Image.Image): columns x rows cells of cell_w x cell_h.
        cell_w (int): cell width. cell_h (int): cell height.
        column_labels (list[str]): one per column. row_labels (list[str]): one per row.

    Returns:
        PIL.Image.Image: the grid with its strips.
    """
    size = max(10, (cell_w + cell_h) // 25)
    font, spacing = _font(size), max(2, size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = cell_w * 3 // 4 if any(row_labels) else 0
    columns = [_wrap(probe, label, font, cell_w) for label in column_labels]
    rows = [_wrap(probe, label, font, max(pad_left - spacing, 1)) for label in row_labels]
    pad_top = (max(_text_block(probe, c, font, spacing // 2)[1] for c in columns) + 2 * spacing
               if any(column_labels) else 0)
    out = Image.new("RGB", (grid.width + pad_left, grid.height + pad_top), "white")
    out.paste(grid, (pad_left, pad_top))
    draw = ImageDraw.Draw(out)
    for i, lines in enumerate(columns if pad_top else []):
        _draw_centered(draw, lines, font, spacing // 2, pad_left + cell_w * i + cell_w / 2, pad_top / 2)
    for j, lines in enumerate(rows if pad_left else []):
        _draw_centered(draw, lines, font, spacing // 2, pad_left / 2, pad_top + cell_h * j + cell_h / 2)
    return out


def _draw_centered(draw, lines: list[str], font, spacing: int, center_x: float, center_y: float) -> None:
    _, height = _text_block(draw, lines, font, spacing)
    draw.multiline_text((center_x, center_y - height / 2), "\n".join(lines), fill="black", font=font,
                        anchor="ma", align="center", spacing=spacing)


def _paste_grid(images: list[list[Image.Image]]) -> Image.Image:
    width, height = images[0][0].size
    grid = Image.new("RGB", (width * len(images[0]), height * len(images)), "white")
    for y, row in enumerate(images):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def draw_labelled_grid(images: dict[tuple[int, int, int], Image.Image], x_labels: list[str], y_labels: list[str],
                       z_labels: list[str]) -> Image.Image:
    """One image of every cell: per z a labelled columns x rows sub-grid, sub-grids side by side under their z
    titles (titles only when there are several).

    Args:
        images (dict): (x, y, z) -> the cell's image; all the same size.
        x_labels (list[str]): column labels. y_labels (list[str]): row labels. z_labels (list[str]): sub-grid titles.

    Returns:
        PIL.Image.Image: the grid.
    """
    cell_w, cell_h = next(iter(images.values())).size
    subgrids = []
    for z in range(len(z_labels)):
        rows = [[images[(x, y, z)] for x in range(len(x_labels))] for y in range(len(y_labels))]
        subgrids.append(annotate(_paste_grid(rows), cell_w, cell_h, x_labels, y_labels))
    if len(subgrids) == 1:
        return subgrids[0]
    sub_w, sub_h = subgrids[0].size
    row = Image.new("RGB", (sub_w * len(subgrids) + _SUBGRID_MARGIN * (len(subgrids) - 1), sub_h), "white")
    for z, subgrid in enumerate(subgrids):
        row.paste(subgrid, (z * (sub_w + _SUBGRID_MARGIN), 0))
    return annotate(row, sub_w + _SUBGRID_MARGIN, sub_h, z_labels, [""])


def infotext(plan_data: dict) -> str:
    """The WebUI's generation-parameters text for a grid ("prompt\\nNegative prompt: ...\\nSteps: 20, ...").

    Args:
        plan_data (dict): `GridPlan.describe()` plus any extra keys (e.g. "lora").

    Returns:
        str: the text.
    """
    axes = plan_data.get("axes", {})
    values = {"Steps": plan_data.get("steps"), "Sampler": plan_data.get("sampler"),
              "CFG scale": plan_data.get("cfg_scale"), "Size": f"{plan_data.get('width')}x{plan_data.get('height')}",
              "Clip skip": plan_data.get("clip_skip"), "LoRA": plan_data.get("lora"),
              **{f"Grid {name.upper()}": "; ".join(axis["labels"]) for name, axis in axes.items()}}
    params = ", ".join(f"{key}: {value}" for key, value in values.items() if value not in (None, ""))
    negative = plan_data.get("negative_prompt") or ""
    return "\n".join([plan_data.get("prompt", ""), *([f"Negative prompt: {negative}"] if negative else []), params])


def save_grid_png(image: Image.Image, path: str | Path, plan_data: dict) -> Path:
    """Write the grid as PNG with its settings as text (atomic).

    Args:
        image (PIL.Image.Image): the grid.
        path (str | Path): the file.
        plan_data (dict): `GridPlan.describe()` plus extra keys; stored as infotext and as JSON.

    Returns:
        Path: the file written.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, infotext(plan_data))
    info.add_text(PNG_GRID_KEY, json.dumps(plan_data, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


def grid_path_beside(lora_path: str | Path) -> Path:
    """A new file name beside a LoRA: `<name>-grid-0001.png`, the first number not taken.

    Args:
        lora_path (str | Path): the LoRA file (need not exist).

    Returns:
        Path: the PNG path.
    """
    lora_path = Path(lora_path)
    number = 1
    while (path := lora_path.with_name(f"{lora_path.stem}-grid-{number:04d}.png")).exists():
        number += 1
    return path


__all__ = ["PNG_GRID_KEY", "PNG_PARAMETERS_KEY", "annotate", "draw_labelled_grid", "grid_path_beside", "infotext",
           "save_grid_png"]
