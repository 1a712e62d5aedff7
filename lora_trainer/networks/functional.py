"""The network formulas, once: LoRA, LoHa and LoKr weight deltas, the layer op, rank and module dropout.

kohya's LoRA (networks/lora.py in kohya-ss/sd-scripts) and LyCORIS's LoHa (lycoris/functional/loha.py) are the
references; these are stateless functions that the module classes call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_diff_weight(down: torch.Tensor, up: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Weight delta `up @ down` of a LoRA/LoCon pair, unscaled.

    Args:
        down (torch.Tensor): `lora_down` weight, `[r, in]` or `[r, in, kh, kw]`.
        up (torch.Tensor): `lora_up` weight, `[out, r]` or `[out, r, 1, 1]`.
        shape (torch.Size | tuple): the target weight shape (`[out, in]` or `[out, in, kh, kw]`).

    Returns:
        torch.Tensor: the delta with the target shape.
    """
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def loha_diff_weight(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, shape: torch.Size | tuple
) -> torch.Tensor:
    """LoHa weight delta `(w1a @ w1b) * (w2a @ w2b)` (Hadamard product of two low-rank products), unscaled.

    Conv kernels use the flattened form LyCORIS stores without Tucker: `w*b` is `[r, in * kh * kw]`.

    Args:
        w1a (torch.Tensor): `hada_w1_a`, `[out, r]`.
        w1b (torch.Tensor): `hada_w1_b`, `[r, in * kh * kw]`.
        w2a (torch.Tensor): `hada_w2_a`, `[out, r]`.
        w2b (torch.Tensor): `hada_w2_b`, `[r, in * kh * kw]`.
        shape (torch.Size | tuple): the target weight shape.

    Returns:
        torch.Tensor: the delta with the target shape.
    """
    return ((w1a @ w1b) * (w2a @ w2b)).reshape(shape)


def layer_op(x: torch.Tensor, weight: torch.Tensor, conv: dict | None) -> torch.Tensor:
    """Apply a weight as the base layer would, without bias.

    Args:
        x (torch.Tensor): the layer input.
        weight (torch.Tensor): `[out, in]` (Linear) or `[out, in, kh, kw]` (Conv2d).
        conv (dict, optional): Conv2d `stride`, `padding`, `dilation`; None for Linear.

    Returns:
        torch.Tensor: `F.linear(x, weight)` or `F.conv2d(x, weight, **conv)`.
    """
    if conv is None:
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, **conv)


def module_dropped(p: float | None, training: bool) -> bool:
    """True when module dropout skips the whole delta for this forward (training only, probability `p`)."""
    return bool(training and p and torch.rand(1).item() < p)


def rank_dropout(h: torch.Tensor, p: float | None, training: bool, channel_dim: int = -1) -> torch.Tensor:
    """Drop whole ranks of a low-rank activation per sample and rescale by 1/(1-p) (kohya's rank_dropout).

    Args:
        h (torch.Tensor): the `lora_down` output; ranks along `channel_dim` (-1 for Linear, 1 for Conv2d), batch
            along dim 0.
        p (float, optional): drop probability; None or 0 disables it.
        training (bool): dropout only applies in training mode.
        channel_dim (int, optional): where the rank axis is, defaults to -1.

    Returns:
        torch.Tensor: `h` with dropped ranks zeroed and the rest scaled by 1/(1-p).
    """
    if not (training and p):
        return h
    channel_dim = channel_dim % h.dim()
    shape = [1] * h.dim()
    shape[channel_dim] = h.shape[channel_dim]
    if h.dim() > 1:
        shape[0] = h.shape[0]
    keep = (torch.rand(shape, device=h.device) > p).to(h.dtype)
    return h * keep / (1.0 - p)


def output_channel_dropout(weight: torch.Tensor, p: float | None, training: bool) -> torch.Tensor:
    """LyCORIS-style rank dropout for weight-form deltas: drop output rows of the delta, rescale by 1/(1-p).

    Args:
        weight (torch.Tensor): a delta weight `[out, ...]`.
        p (float, optional): drop probability; None or 0 disables it.
        training (bool): dropout only applies in training mode.

    Returns:
        torch.Tensor: the masked, rescaled delta.
    """
    if not (training and p):
        return weight
    keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(weight.dtype)
    return weight * keep.view(-1, *([1] * (weight.dim() - 1))) / (1.0 - p)


def dropout(h: torch.Tensor, p: float | None, training: bool) -> torch.Tensor:
    """Plain (neuron) dropout, kohya's network_dropout on the down output; identity outside training."""
    if not (training and p):
        return h
    return F.dropout(h, p=p, training=True)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into `(m, n)`, `m <= n`, `m * n == dimension`, as LyCORIS's LoKr does.

    A positive `factor` that divides `dimension` is taken as `m`; otherwise `m` grows through the divisors while
    `m + n` shrinks and `m` stays within `factor` (-1: no bound, so the pair nearest the square root).

    Args:
        dimension (int): the size to split.
        factor (int, optional): the wanted smaller factor, or -1, defaults to -1.

    Returns:
        tuple[int, int]: `(m, n)`.
    """
    if factor > 0 and dimension % factor == 0:
        return (factor, dimension // factor) if factor <= dimension // factor else (dimension // factor, factor)
    bound = dimension if factor <= 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def lokr_diff_weight(w1: torch.Tensor, w2: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """LoKr weight delta `kron(w1, w2)`, unscaled (LyCORIS `lokr_*` keys, as the WebUI rebuilds them).

    Conv kernels ride on the second factor: `w2` is `[out_k, in_n, kh, kw]` (or its flattened `[out_k, in_n*kh*kw]`),
    and the Kronecker product of the flattened factors reshaped to the target is the same weight.

    Args:
        w1 (torch.Tensor): `lokr_w1`, `[out_l, in_m]`.
        w2 (torch.Tensor): `lokr_w2`, or `lokr_w2_a @ lokr_w2_b`.
        shape (torch.Size | tuple): the target weight shape.

    Returns:
        torch.Tensor: the delta with the target shape.
    """
    return torch.kron(w1, w2.reshape(w2.shape[0], -1)).reshape(shape)
