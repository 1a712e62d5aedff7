"""Caption encoding with CLIP text encoders the way kohya and the WebUI do it.

Captions are tokenized without special tokens, cut to `max_token_length` (75, 150 or 225) and split into chunks of
75 tokens; each chunk becomes `BOS + tokens + EOS + padding` (77 ids) and is encoded on its own, and the chunk
outputs are concatenated along T (the WebUI's rule: T = 77 * chunks).
SD1/SD2: `hidden_states[-clip_skip]` followed by the final layer norm (kohya `get_hidden_states`).
SDXL: te1 penultimate hidden state, te2 penultimate hidden state (neither normed), concatenated to 2048 channels;
pooled = te2's `text_projection(final_layer_norm(last hidden)[EOS])` of the first chunk (kohya
`get_hidden_states_sdxl`).
"""
from __future__ import annotations

import torch
from torch import nn

from lora_trainer.models.adapter import TextConditioning

CHUNK = 75
VALID_TOKEN_LENGTHS = (75, 150, 225)


def _check_token_length(max_token_length: int) -> int:
    if max_token_length not in VALID_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length={max_token_length}: must be one of {VALID_TOKEN_LENGTHS}. "
                         "Set max_token_length to 75, 150 or 225.")
    return max_token_length // CHUNK


def tokenize_chunks(tokenizer, captions: list[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids in chunks of 77: `[B, chunks, 77]`.

    Args:
        tokenizer: a transformers CLIP tokenizer (its pad token decides the padding: EOS for CLIP-L, "!" for
            OpenCLIP).
        captions (list[str]): the captions.
        max_token_length (int, optional): 75, 150 or 225, defaults to 75.

    Returns:
        torch.Tensor: long ids; every chunk starts with BOS and has an EOS right after its last token.
    """
    chunks = _check_token_length(max_token_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(captions), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    rows = []
    for ids in encoded:
        ids = list(ids)[:max_token_length]
        row = []
        for c in range(chunks):
            part = ids[c * CHUNK:(c + 1) * CHUNK]
            row.append([bos] + part + [eos] + [pad] * (CHUNK - len(part)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def _inner(text_encoder: nn.Module) -> nn.Module:
    # CLIPTextModelWithProjection (and CLIPTextModel before transformers 5.6) wrap the model in `.text_model`.
    return getattr(text_encoder, "text_model", text_encoder)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _hidden_states(text_encoder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = ids.reshape(-1, ids.shape[-1]).to(_device(text_encoder))
    out = text_encoder(input_ids=flat, output_hidden_states=True)
    return out.hidden_states


def _unchunk(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    # [B*chunks, 77, C] -> [B, chunks*77, C]
    return hidden.reshape(batch, -1, hidden.shape[-1])


def encode_clip(text_encoder: nn.Module, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """SD1/SD2 conditioning: `final_layer_norm(hidden_states[-clip_skip])` per chunk, chunks concatenated.

    Args:
        text_encoder (nn.Module): a transformers `CLIPTextModel`.
        ids (torch.Tensor): `[B, chunks, 77]` from tokenize_chunks.
        clip_skip (int, optional): 1 = last layer, 2 = penultimate, ..., defaults to 1.

    Returns:
        torch.Tensor: `[B, 77*chunks, C]`.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip={clip_skip}: must be 1 or more. Use 1 for the last layer, 2 for the penultimate.")
    hidden = _hidden_states(text_encoder, ids)[-clip_skip]
    hidden = _inner(text_encoder).final_layer_norm(hidden)
    return _unchunk(hidden, ids.shape[0])


def _eos_positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    return (ids == eos).int().argmax(dim=-1)


def encode_sdxl(
    text_encoders: list[nn.Module], ids: list[torch.Tensor], eos_token_id: int
) -> TextConditioning:
    """SDXL conditioning from both encoders (kohya ignores clip_skip for SDXL).

    Args:
        text_encoders (list[nn.Module]): `[CLIPTextModel, CLIPTextModelWithProjection]`.
        ids (list[torch.Tensor]): each `[B, chunks, 77]` from tokenize_chunks with that encoder's tokenizer.
        eos_token_id (int): the EOS id (49407 for both SDXL tokenizers).

    Returns:
        TextConditioning: crossattn `[B, 77*chunks, 2048]` and pooled `[B, 1280]`.
    """
    te1, te2 = text_encoders
    batch = ids[0].shape[0]
    hidden1 = _unchunk(_hidden_states(te1, ids[0])[-2], batch)
    states2 = _hidden_states(te2, ids[1])
    hidden2 = _unchunk(states2[-2], batch)
    first = ids[1][:, 0].to(states2[-1].device)
    last = _inner(te2).final_layer_norm(states2[-1].reshape(batch, -1, *states2[-1].shape[1:])[:, 0])
    pooled_in = last[torch.arange(batch, device=last.device), _eos_positions(first, eos_token_id)]
    pooled = te2.text_projection(pooled_in.to(te2.text_projection.weight.dtype))
    crossattn = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
    return TextConditioning(crossattn, pooled)


def encode_captions_sd(tokenizer, text_encoder: nn.Module, captions: list[str], clip_skip: int = 1,
                       max_token_length: int = 75) -> TextConditioning:
    """Tokenize and encode captions for SD1/SD2 (transformers CLIP).

    Args:
        tokenizer: the CLIP tokenizer.
        text_encoder (nn.Module): the `CLIPTextModel`.
        captions (list[str]): the captions.
        clip_skip (int, optional): defaults to 1.
        max_token_length (int, optional): 75, 150 or 225, defaults to 75.

    Returns:
        TextConditioning: crossattn `[B, 77*chunks, C]`, no pooled.
    """
    ids = tokenize_chunks(tokenizer, captions, max_token_length)
    return TextConditioning(encode_clip(text_encoder, ids, clip_skip))


def encode_captions_sdxl(tokenizers: list, text_encoders: list[nn.Module], captions: list[str],
                         max_token_length: int = 75) -> TextConditioning:
    """Tokenize and encode captions for SDXL with both tokenizers and encoders.

    Args:
        tokenizers (list): `[CLIP-L tokenizer, OpenCLIP tokenizer]`.
        text_encoders (list[nn.Module]): `[CLIPTextModel, CLIPTextModelWithProjection]`.
        captions (list[str]): the captions.
        max_token_length (int, optional): 75, 150 or 225, defaults to 75.

    Returns:
        TextConditioning: crossattn `[B, 77*chunks, 2048]`, pooled `[B, 1280]`.
    """
    ids = [tokenize_chunks(tok, captions, max_token_length) for tok in tokenizers]
    return encode_sdxl(text_encoders, ids, tokenizers[1].eos_token_id)


def encode_open_clip(model: nn.Module, ids: torch.Tensor, layer_idx: int = 1) -> torch.Tensor:
    """SD2 conditioning through an OpenCLIP text tower (ldm `FrozenOpenCLIPEmbedder.model`).

    Runs the resblocks up to `len - layer_idx` and applies `ln_final`, as ldm's embedder does ("penultimate":
    layer_idx 1; "last": 0).

    Args:
        model (nn.Module): has `token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
            `attn_mask`.
        ids (torch.Tensor): `[B, chunks, 77]` from tokenize_chunks (OpenCLIP tokenizer, pad "!").
        layer_idx (int, optional): how many final resblocks to skip, defaults to 1.

    Returns:
        torch.Tensor: `[B, 77*chunks, C]`.
    """
    batch = ids.shape[0]
    flat = ids.reshape(-1, ids.shape[-1]).to(model.positional_embedding.device)
    x = model.token_embedding(flat) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    blocks = model.transformer.resblocks
    for block in list(blocks)[: len(blocks) - layer_idx]:
        x = block(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    return _unchunk(model.ln_final(x), batch)
