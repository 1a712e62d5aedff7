"""Weights that make a tiny `AutoencoderKL` reconstruct its input by construction: decode(encode(x)) ~ x.

A random tiny VAE turns every latent into colour noise, so nothing a LoRA learns shows in its samples. Training one
takes minutes; setting its signal path instead takes milliseconds and keeps the real key layout:

- the latent is the image averaged over 8x8 blocks (RGB, times `1 / scaling_factor`; the fourth channel is 0), and
  decoding repeats each latent pixel over its 8x8 block, so an image made of 8x8 blocks comes back exactly;
- a resnet block whose last conv is zero is its shortcut (identity, or a 1x1 channel map); attention with a zero
  output projection is the identity; a downsampler (pad right/bottom, 3x3 stride 2) with 1/4 on its top-left 2x2
  taps averages 2x2 blocks; an upsampler (nearest x2, then 3x3) with only its centre tap repeats pixels;
- the GroupNorm before each `conv_out` would remove colour (a group's mean) and scale. Each colour travels as a pair
  (+v, -v) inside one group, so the group mean is 0, and at a tiny amplitude (`SIGNAL`), so the group variance is
  far below GroupNorm's eps (1e-6 in diffusers and ldm) and the norm only multiplies by 1/sqrt(eps). After SiLU,
  silu(z) - silu(-z) = z exactly, so `conv_out` takes the pair's difference and undoes the known scale.

The relative error is about var/(2*eps) <= SIGNAL**2/(2e-6) = 5e-5 for pixels in [-1, 1]. Needs at least two
channels per GroupNorm group before both `conv_out`s (widths >= 64 with 32 groups); float32 or bfloat16 (the
tiny amplitude is below float16's normal range).
"""
from __future__ import annotations

import torch

SIGNAL = 1e-5  # pixel amplitude on the signal path: keeps GroupNorm's variance far below its eps
LOG_VARIANCE = -30.0  # the posterior's log-variance (the clamp's floor): sampling the latent adds ~3e-7 noise
COLOURS = 3


def _pair_embedding(channels: int, groups: int) -> torch.Tensor:
    """`[channels, 3]`: colour i as (+1, -1) on the first two channels of group i."""
    per_group = channels // groups
    if per_group < 2 or groups < COLOURS:
        raise ValueError(f"VAE width {channels}: needs at least 2 channels in each of {COLOURS}+ GroupNorm groups "
                         f"(has {per_group} in {groups}). Use widths of at least {2 * groups}.")
    embedding = torch.zeros(channels, COLOURS)
    for colour in range(COLOURS):
        embedding[colour * per_group, colour] = 1.0
        embedding[colour * per_group + 1, colour] = -1.0
    return embedding


def _channel_map(out_channels: int, in_channels: int, groups: int) -> torch.Tensor:
    """`[out, in]`: carries the colour pairs from one width's layout to another's (zero elsewhere)."""
    return _pair_embedding(out_channels, groups) @ _pair_embedding(in_channels, groups).T / 2


def _set_conv(conv: torch.nn.Conv2d, taps: dict[tuple[int, int], torch.Tensor], bias: torch.Tensor | None = None):
    conv.weight.zero_()
    for (row, col), matrix in taps.items():
        conv.weight[:, :, row, col] = matrix
    conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))


def _identity_blocks(vae, groups: int) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            _set_conv(module.conv2, {})  # the residual branch adds nothing; conv1 and the norms stay as they are
            if module.conv_shortcut is not None:
                shortcut = module.conv_shortcut
                _set_conv(shortcut, {(0, 0): _channel_map(shortcut.out_channels, shortcut.in_channels, groups)})
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif isinstance(module, Downsample2D):
            keep = _channel_map(module.conv.out_channels, module.conv.in_channels, groups) / 4
            _set_conv(module.conv, {(0, 0): keep, (0, 1): keep, (1, 0): keep, (1, 1): keep})
        elif isinstance(module, Upsample2D):
            _set_conv(module.conv, {(1, 1): _channel_map(module.conv.out_channels, module.conv.in_channels, groups)})


def _pair_norm_gains(norm: torch.nn.GroupNorm) -> torch.Tensor:
    """Share each pair's GroupNorm weight (kept random: any value works if both halves match), zero its bias.

    Returns:
        torch.Tensor: `[3]` the gain each colour leaves the norm with.
    """
    embedding = _pair_embedding(norm.num_channels, norm.num_groups)
    plus, minus = embedding.argmax(dim=0), embedding.argmin(dim=0)
    norm.weight[minus] = norm.weight[plus]
    norm.bias[plus] = 0.0
    norm.bias[minus] = 0.0
    return norm.weight[plus] * SIGNAL / norm.eps**0.5  # var << eps: the norm divides by sqrt(eps)


def _read_pairs(conv: torch.nn.Conv2d, norm: torch.nn.GroupNorm, out_gains: torch.Tensor) -> None:
    """`conv_out` after norm and SiLU: output colour i = out_gains[i] * (silu(+z) - silu(-z)) / norm gain = pixel."""
    gains = _pair_norm_gains(norm)
    embedding = _pair_embedding(norm.num_channels, norm.num_groups)
    matrix = torch.zeros(conv.out_channels, conv.in_channels)
    matrix[:COLOURS] = (embedding * (out_gains / gains)).T
    bias = torch.zeros(conv.out_channels)
    _set_conv(conv, {(1, 1): matrix}, bias)


@torch.no_grad()
def make_vae_reconstruct(vae) -> None:
    """Set a diffusers `AutoencoderKL`'s signal path so that it reconstructs images (in place).

    Latent = 8x8 block mean of RGB / scaling_factor (fourth channel 0); decoding repeats each latent pixel over its
    block. Weights off the signal path (norms inside blocks, first convs, attention q/k/v) keep their values.

    Args:
        vae (diffusers.AutoencoderKL): 3 image channels, 4 latent channels, GroupNorm widths >= 2 per group before
            both `conv_out`s.
    """
    groups = vae.encoder.conv_norm_out.num_groups
    latent = vae.config.latent_channels
    gain = 1.0 / vae.config.scaling_factor  # the diffusion model then sees latents ~ pixels in [-1, 1]
    _identity_blocks(vae, groups)
    encoder, decoder = vae.encoder, vae.decoder
    _set_conv(encoder.conv_in, {(1, 1): _pair_embedding(encoder.conv_in.out_channels, groups) * SIGNAL})
    _read_pairs(encoder.conv_out, encoder.conv_norm_out, torch.full((COLOURS,), gain))
    encoder.conv_out.bias[latent:] = LOG_VARIANCE
    _set_conv(vae.quant_conv, {(0, 0): torch.eye(2 * latent)})
    _set_conv(vae.post_quant_conv, {(0, 0): torch.eye(latent)})
    to_pairs = torch.zeros(decoder.conv_in.out_channels, latent)
    to_pairs[:, :COLOURS] = _pair_embedding(decoder.conv_in.out_channels, groups) * (SIGNAL / gain)
    _set_conv(decoder.conv_in, {(1, 1): to_pairs})
    _read_pairs(decoder.conv_out, decoder.conv_norm_out, torch.ones(COLOURS))


__all__ = ["make_vae_reconstruct"]
