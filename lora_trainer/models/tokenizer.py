"""An offline CLIP BPE tokenizer: `vocab.json` + `merges.txt` derived from OpenCLIP's BPE merge list.

OpenAI CLIP, OpenCLIP (SD2, SDXL) and `transformers.CLIPTokenizer` share one byte-level BPE vocabulary of 49408
tokens. OpenCLIP ships its merge list as `bpe_simple_vocab_16e6.txt.gz`; the vocabulary is built from it the way
OpenAI's `simple_tokenizer.py` does: the 256 byte characters, the same with `</w>`, one token per merge (the first
48894 merges), then `<|startoftext|>` and `<|endoftext|>`. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import shutil
from pathlib import Path

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48894, as OpenAI CLIP
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP-L (SD1, SDXL te1) pads with <|endoftext|>; OpenCLIP (SD2, SDXL te2) pads with "!" (id 0).
PAD_CLIP_L = EOS_TOKEN
PAD_OPEN_CLIP = "!"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP).

    Returns:
        dict[int, str]: 256 entries in vocabulary order: the printable Latin-1 bytes (mapped to themselves)
            first, then the other bytes (mapped to chars from U+0100 on).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def find_bpe_file() -> Path:
    """Locate OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` in the installed `open_clip` package (not imported).

    Returns:
        Path: the file.

    Raises:
        ModelLoadError: when open_clip is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"{BPE_FILE_NAME}: not found (package open_clip is {'installed' if folders else 'not installed'}). "
        "Install it with `pip install --no-deps open_clip_torch`, or pass a tokenizer folder holding "
        "vocab.json and merges.txt."
    )


def read_merges(bpe_path: str | Path) -> list[tuple[str, str]]:
    """Read the first 48894 merges of an OpenCLIP BPE file (`.txt.gz` or plain `.txt`).

    Args:
        bpe_path (str | Path): the merge file; its first line is a header.

    Returns:
        list[tuple[str, str]]: the merges in rank order.
    """
    path = Path(bpe_path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ModelLoadError(
            f"{path}: not a CLIP BPE merge file (expected {NUM_MERGES} merge pairs after a header line). "
            f"Use OpenCLIP's {BPE_FILE_NAME}."
        )
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The CLIP vocabulary (token -> id) for a merge list.

    Args:
        merges (list[tuple[str, str]]): the merges from `read_merges`.

    Returns:
        dict[str, int]: 49408 tokens for the full merge list.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _resolve_source(source: str | Path | None) -> tuple[Path | None, Path | None]:
    """(folder with vocab.json + merges.txt, or None; BPE file, or None)."""
    if source is None:
        return None, find_bpe_file()
    path = Path(source)
    if path.is_dir():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return path, None
        if (path / BPE_FILE_NAME).is_file():
            return None, path / BPE_FILE_NAME
        raise ModelLoadError(
            f"{path}: holds neither vocab.json + merges.txt nor {BPE_FILE_NAME}. "
            "Point it at a CLIP tokenizer folder or at OpenCLIP's BPE file."
        )
    if path.is_file():
        return None, path
    raise FileNotFoundError(f"{path}: no such file or folder. Give OpenCLIP's {BPE_FILE_NAME} or a tokenizer folder.")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1 if len(data) < 100 else None), encoding="utf-8")


def write_clip_tokenizer(out_dir: str | Path, pad_token: str = PAD_CLIP_L, source: str | Path | None = None) -> Path:
    """Write a folder that `transformers.CLIPTokenizer.from_pretrained` loads offline.

    Args:
        out_dir (str | Path): the folder to write (created).
        pad_token (str, optional): `"<|endoftext|>"` (CLIP-L, SD1/SDXL te1) or `"!"` (OpenCLIP, SD2/SDXL te2),
            defaults to `"<|endoftext|>"`.
        source (str | Path, optional): OpenCLIP's BPE file, or a folder holding it or holding vocab.json +
            merges.txt; defaults to the file inside the installed `open_clip` package.

    Returns:
        Path: `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder, bpe_file = _resolve_source(source)
    if pad_token not in (PAD_CLIP_L, PAD_OPEN_CLIP):
        raise ValueError(f"pad_token={pad_token!r}: not a CLIP pad token. Use '<|endoftext|>' or '!'.")
    if folder is not None:
        if folder.resolve() != out.resolve():
            shutil.copyfile(folder / "vocab.json", out / "vocab.json")
            shutil.copyfile(folder / "merges.txt", out / "merges.txt")
    else:
        merges = read_merges(bpe_file)
        _write_json(out / "vocab.json", build_vocab(merges))
        merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
        (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    _write_json(out / "special_tokens_map.json", special)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    _write_json(out / "tokenizer_config.json", config)
    logger.debug("wrote CLIP tokenizer (pad %r) to %s", pad_token, out)
    return out
