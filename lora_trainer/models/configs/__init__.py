"""Shipped full-size diffusers config folders (SD1.5, SD2.1, SDXL base 1.0), so nothing is fetched at run time.

Each folder holds `model_index.json`, `unet/`, `vae/`, `text_encoder/` (+ `text_encoder_2/` for SDXL) and
`scheduler/` configs. Tokenizer files are not shipped: `write_config_dir` adds them (see `models/tokenizer.py`).
SD2's folder serves "sd2" and "sd2-v" (SD2.1 768-v and 512 base share the UNet; v-prediction is a flag the
loader passes on; the shipped scheduler says "epsilon").
"""
from __future__ import annotations

import shutil
from pathlib import Path

from lora_trainer.models.tokenizer import PAD_CLIP_L, PAD_OPEN_CLIP, write_clip_tokenizer

_HERE = Path(__file__).resolve().parent
_FOLDERS = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}
# Tokenizer sub-folders per architecture and their pad token.
TOKENIZERS = {
    "sd1": {"tokenizer": PAD_CLIP_L},
    "sd2": {"tokenizer": PAD_OPEN_CLIP},
    "sd2-v": {"tokenizer": PAD_OPEN_CLIP},
    "sdxl": {"tokenizer": PAD_CLIP_L, "tokenizer_2": PAD_OPEN_CLIP},
}


def config_dir(arch: str) -> Path:
    """The shipped (read-only) diffusers config folder of an architecture.

    Args:
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".

    Returns:
        Path: the folder (no tokenizer files in it).
    """
    if arch not in _FOLDERS:
        raise ValueError(f"arch={arch!r}: no shipped config. Use one of {sorted(_FOLDERS)}.")
    return _HERE / _FOLDERS[arch]


def write_config_dir(arch: str, out_dir: str | Path, tokenizer_source: str | Path | None = None) -> Path:
    """Copy the shipped config folder and add the generated tokenizer folder(s): a complete local `config=`
    for diffusers' `from_single_file(..., local_files_only=True)`.

    Args:
        arch (str): "sd1", "sd2", "sd2-v" or "sdxl".
        out_dir (str | Path): destination folder (created; existing files are overwritten).
        tokenizer_source (str | Path, optional): passed to `write_clip_tokenizer` as `source`, defaults to None
            (OpenCLIP's BPE file from the installed package).

    Returns:
        Path: `out_dir`.
    """
    out = Path(out_dir)
    shutil.copytree(config_dir(arch), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    for sub, pad in TOKENIZERS[arch].items():
        write_clip_tokenizer(out / sub, pad_token=pad, source=tokenizer_source)
    return out


__all__ = ["TOKENIZERS", "config_dir", "write_config_dir"]
