"""Caption encoding through the WebUI's own CLIP wrappers (`...WithCustomWords`), at a fixed chunk count.

The WebUI encodes a prompt in 75-token chunks (77 with start/end) and concatenates them along T, with as many chunks
as the longest prompt needs. Training batches (and the text-encoder cache) need one length for every caption, so
`encode_chunks` always gives `max_token_length / 75` chunks: longer captions are cut, shorter ones get the WebUI's own
empty chunks. Nothing here imports the WebUI; `a1111.py` passes its objects in.
"""
from __future__ import annotations

import contextlib

import torch

from lora_trainer.models.adapter import TextConditioning

CHUNK_TOKENS = 75


def chunk_count(max_token_length: int) -> int:
    """75 -> 1, 150 -> 2, 225 -> 3 (anything else rounds up to whole chunks)."""
    return max(1, -(-int(max_token_length or CHUNK_TOKENS) // CHUNK_TOKENS))


def encode_chunks(wrapper, captions: list[str], chunks: int,
                  fixes_owner=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode captions with a WebUI text wrapper, exactly `chunks` chunks each.

    Args:
        wrapper: a WebUI `FrozenCLIPEmbedderWithCustomWords`-like object (`process_texts`, `empty_chunk`,
            `process_tokens`, `hijack`).
        captions (list[str]): the captions (taken literally when the caller set emphasis to "None").
        chunks (int): chunks per caption.
        fixes_owner (optional): the object whose `fixes` the embedding layer reads, defaults to `wrapper.hijack`
            (A1111); Forge's text engine keeps them on its `embeddings`.

    Returns:
        tuple: `[B, 77*chunks, C]` and the pooled output of the first chunk (None when the wrapper has none).
    """
    batch_chunks, _ = wrapper.process_texts(list(captions))
    owner = wrapper.hijack if fixes_owner is None else fixes_owner
    zs = []
    for i in range(chunks):
        batch = [c[i] if i < len(c) else wrapper.empty_chunk() for c in batch_chunks]
        owner.fixes = [x.fixes for x in batch]
        zs.append(wrapper.process_tokens([x.tokens for x in batch], [x.multipliers for x in batch]))
    pooled = getattr(zs[0], "pooled", None)
    return torch.hstack(zs), pooled


@contextlib.contextmanager
def temporary_options(opts, **values):
    """Set WebUI options for the duration of the block (only those the options object has) and put them back."""
    missing = object()
    saved = {}
    for key, value in values.items():
        if key in getattr(opts, "data_labels", {}) or key in opts.data:
            saved[key] = opts.data.get(key, missing)
            opts.data[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is missing:
                opts.data.pop(key, None)
            else:
                opts.data[key] = value


def sd_text_encoder(cond_stage_model, opts):
    """The `text_encode` function of an SD1/SD2 WebUI model (`shared.sd_model.cond_stage_model`).

    Args:
        cond_stage_model: the WebUI's wrapper around the ldm embedder.
        opts: `modules.shared.opts` (clip skip and emphasis are set per call).

    Returns:
        callable: `(captions, clip_skip, max_token_length) -> TextConditioning`.
    """
    def encode(captions: list[str], clip_skip: int, max_token_length: int) -> TextConditioning:
        with temporary_options(opts, CLIP_stop_at_last_layers=max(1, int(clip_skip or 1)), emphasis="None"):
            z, _ = encode_chunks(cond_stage_model, captions, chunk_count(max_token_length))
        return TextConditioning(z)

    return encode


def sdxl_text_encoder(embedders, opts):
    """The `text_encode` function of an SDXL WebUI model: both wrapped embedders, crossattn concatenated along
    channels (te1 then te2) and the pooled te2 output, as sgm's `GeneralConditioner` builds them.

    Args:
        embedders (list): `shared.sd_model.conditioner.embedders[:2]` (WebUI wrappers).
        opts: `modules.shared.opts`.

    Returns:
        callable: `(captions, clip_skip, max_token_length) -> TextConditioning`.
    """
    te1, te2 = embedders[0], embedders[1]

    def encode(captions: list[str], clip_skip: int, max_token_length: int) -> TextConditioning:
        chunks = chunk_count(max_token_length)
        with temporary_options(opts, emphasis="None"):
            z1, _ = encode_chunks(te1, captions, chunks)
            z2, pooled = encode_chunks(te2, captions, chunks)
        if pooled is None:
            raise ValueError("SDXL text encoder 2 gave no pooled output; the WebUI's conditioner layout is not the "
                             "one this trainer knows (sgm FrozenOpenCLIPEmbedder2 with always_return_pooled).")
        return TextConditioning(torch.cat([z1, z2.to(z1.dtype)], dim=2), pooled)

    return encode
