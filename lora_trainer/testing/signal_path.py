"""Weights set by construction, so that a tiny model does something meaningful without training.

A random tiny model renders colour noise whatever a LoRA learns. Training its parts takes minutes; setting a few
weights takes milliseconds and keeps the real key layout. Two constructions:

`make_vae_reconstruct(vae)`: decode(encode(x)) ~ x.
- The latent is the image averaged over 8x8 blocks (RGB, times `1 / scaling_factor`; the fourth channel is 0), and
  decoding repeats each latent pixel over its 8x8 block, so an image made of 8x8 blocks comes back exactly.
- A resnet block whose last conv is zero is its shortcut (identity, or a 1x1 channel map); attention with a zero
  output projection is the identity; a downsampler (pad right/bottom, 3x3 stride 2) with 1/4 on its top-left 2x2
  taps averages 2x2 blocks; an upsampler (nearest x2, then 3x3) with only its centre tap repeats pixels.
- The GroupNorm before each `conv_out` would remove colour (a group's mean) and scale. Each colour travels as a pair
  (+v, -v) inside one group, so the group mean is 0, and at a tiny amplitude (`SIGNAL`), so the group variance is
  far below GroupNorm's eps (1e-6 in diffusers and ldm) and the norm only multiplies by 1/sqrt(eps). After SiLU,
  silu(z) - silu(-z) = z exactly, so `conv_out` takes the pair's difference and undoes the known scale. The
  relative error is about var/(2*eps) <= SIGNAL**2/2e-6 = 5e-5 for pixels in [-1, 1]. Float32 or bfloat16 (the
  tiny amplitude is below float16's normal range).

`make_unet_identity(unet)`: the UNet predicts its input, scaled to unit RMS per latent channel, as the noise: a
denoiser that takes everything for noise (sampling it gives faint grey noise), whose transformer blocks add nothing
yet. A LoRA on those blocks then only has to learn what its images add, which takes a few dozen steps; on a random
UNet it first has to learn to denoise at all. Same blocks as the VAE, with the UNet's downsampler (3x3 stride 2,
padding 1: the 2x2 taps sit at the centre) and its skip connections (each up block's shortcut averages the path from
below with the skip). Its resnets' last convs are zero on the pair channels only: the other channels carry random
features of the input and the timestep, which the transformer blocks (and a LoRA on them) read; without the
timestep a LoRA learns only a blur of its images. The final GroupNorm sees each latent channel as a (+v, -v) pair
at full amplitude, so it keeps the colour and divides by the channel's RMS, and `conv_out` reads the pair after
SiLU as above. Weights off the signal path (first convs, norms, attention, time embedding) stay random.

Both need at least two channels per GroupNorm group where they read pairs (widths >= 64 with 32 groups).
"""
from __future__ import annotations

import torch

SIGNAL = 1e-5  # pixel amplitude on the VAE's signal path: keeps GroupNorm's variance far below its eps
LOG_VARIANCE = -30.0  # the posterior's log-variance (the clamp's floor): sampling the latent adds ~3e-7 noise
COLOURS = 3
UP_SKIP_SHARE = 0.5  # an up block's shortcut: this much of the skip connection, the rest from the path below


def _pair_embedding(channels: int, groups: int, signals: int) -> torch.Tensor:
    """`[channels, signals]`: signal i as (+1, -1) on the first two channels of GroupNorm group i."""
    per_group = channels // groups
    if per_group < 2 or groups < signals:
        raise ValueError(f"width {channels}: needs at least 2 channels in each of {signals}+ GroupNorm groups "
                         f"(has {per_group} in {groups}). Use widths of at least {2 * groups}.")
    embedding = torch.zeros(channels, signals)
    for signal in range(signals):
        embedding[signal * per_group, signal] = 1.0
        embedding[signal * per_group + 1, signal] = -1.0
    return embedding


def _channel_map(out_channels: int, in_channels: int, groups: int, signals: int) -> torch.Tensor:
    """`[out, in]`: carries the pairs from one width's layout to another's (zero elsewhere)."""
    return _pair_embedding(out_channels, groups, signals) @ _pair_embedding(in_channels, groups, signals).T / 2


def _set_conv(conv: torch.nn.Conv2d, taps: dict[tuple[int, int], torch.Tensor], bias: torch.Tensor | None = None):
    conv.weight.zero_()
    for (row, col), matrix in taps.items():
        conv.weight[:, :, row, col] = matrix
    conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))


def _up_shortcut(resnet, index: int, groups: int, signals: int) -> torch.Tensor:
    """An up block's resnet reads `cat([h, skip])`; its first takes h at the previous block's width."""
    out_channels, in_channels = resnet.conv_shortcut.out_channels, resnet.conv_shortcut.in_channels
    from_below = out_channels if index > 0 else in_channels - out_channels
    return torch.cat([(1 - UP_SKIP_SHARE) * _channel_map(out_channels, from_below, groups, signals),
                      UP_SKIP_SHARE * _channel_map(out_channels, in_channels - from_below, groups, signals)], dim=1)


def _silence_pairs(conv: torch.nn.Conv2d, groups: int, signals: int) -> None:
    """Zero a resnet's last conv on the pair channels only: the signal passes unchanged, the other channels keep
    random features of the input and the timestep for the blocks after it to read."""
    pairs = _pair_embedding(conv.out_channels, groups, signals).abs().sum(dim=1) > 0
    conv.weight[pairs] = 0.0
    conv.bias[pairs] = 0.0


def _identity_blocks(model, groups: int, signals: int, downsample_taps: tuple[int, int],
                     keep_features: bool = False) -> None:
    """Resnets become their shortcuts (on the pair channels only with `keep_features`), attention the identity,
    downsamplers 2x2 means, upsamplers repeats."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def channel_map(conv):
        return _channel_map(conv.out_channels, conv.in_channels, groups, signals)

    for name, module in model.named_modules():
        if isinstance(module, ResnetBlock2D):
            if keep_features:
                _silence_pairs(module.conv2, groups, signals)
            else:
                _set_conv(module.conv2, {})  # the residual branch adds nothing; conv1 and the norms stay as they are
            if module.conv_shortcut is not None:
                is_up = name.startswith("up_blocks.")
                index = int(name.rsplit(".", 1)[1])
                matrix = _up_shortcut(module, index, groups, signals) if is_up else channel_map(module.conv_shortcut)
                _set_conv(module.conv_shortcut, {(0, 0): matrix})
        elif isinstance(module, Attention) and getattr(module, "residual_connection", False):
            module.to_out[0].weight.zero_()  # the VAE's mid-block attention
            module.to_out[0].bias.zero_()
        elif isinstance(module, Transformer2DModel):
            module.proj_out.weight.zero_()  # a UNet transformer block adds its output to its input
            module.proj_out.bias.zero_()
        elif isinstance(module, Downsample2D):
            row, col = downsample_taps
            mean = channel_map(module.conv) / 4
            _set_conv(module.conv, {(r, c): mean for r in (row, row + 1) for c in (col, col + 1)})
        elif isinstance(module, Upsample2D):
            _set_conv(module.conv, {(1, 1): channel_map(module.conv)})


def _share_pair_norm(norm: torch.nn.GroupNorm, signals: int) -> torch.Tensor:
    """Share each pair's GroupNorm weight (kept random: any value works if both halves match), zero its bias.

    Returns:
        torch.Tensor: `[signals]` each pair's weight.
    """
    embedding = _pair_embedding(norm.num_channels, norm.num_groups, signals)
    plus, minus = embedding.argmax(dim=0), embedding.argmin(dim=0)
    norm.weight[minus] = norm.weight[plus]
    norm.bias[plus] = 0.0
    norm.bias[minus] = 0.0
    return norm.weight[plus].clone()


def _read_pairs(conv: torch.nn.Conv2d, norm: torch.nn.GroupNorm, gains: torch.Tensor) -> None:
    """`conv_out` after norm and SiLU: output i = gains[i] * (silu(+z) - silu(-z)) = gains[i] * z (exact)."""
    signals = len(gains)
    embedding = _pair_embedding(norm.num_channels, norm.num_groups, signals)
    matrix = torch.zeros(conv.out_channels, conv.in_channels)
    matrix[:signals] = (embedding * gains).T
    _set_conv(conv, {(1, 1): matrix})


@torch.no_grad()
def make_vae_reconstruct(vae) -> None:
    """Set a diffusers `AutoencoderKL`'s signal path so that it reconstructs images (in place).

    Latent = 8x8 block mean of RGB / scaling_factor (fourth channel 0); decoding repeats each latent pixel over its
    block. Weights off the signal path (norms inside blocks, first convs, attention q/k/v) keep their values.

    Args:
        vae (diffusers.AutoencoderKL): 3 image channels, 4 latent channels, widths >= 2 per GroupNorm group before
            both `conv_out`s.
    """
    groups = vae.encoder.conv_norm_out.num_groups
    latent = vae.config.latent_channels
    gain = 1.0 / vae.config.scaling_factor  # the diffusion model then sees latents ~ pixels in [-1, 1]
    _identity_blocks(vae, groups, COLOURS, downsample_taps=(0, 0))  # padded right/bottom: block at the top left
    encoder, decoder = vae.encoder, vae.decoder
    norm_scale = SIGNAL / encoder.conv_norm_out.eps**0.5  # var << eps: the norm multiplies by 1/sqrt(eps)
    pairs_in = _pair_embedding(encoder.conv_in.out_channels, groups, COLOURS) * SIGNAL
    _set_conv(encoder.conv_in, {(1, 1): pairs_in})
    weights = _share_pair_norm(encoder.conv_norm_out, COLOURS)
    _read_pairs(encoder.conv_out, encoder.conv_norm_out, gain / (weights * norm_scale))
    encoder.conv_out.bias[latent:] = LOG_VARIANCE
    _set_conv(vae.quant_conv, {(0, 0): torch.eye(2 * latent)})
    _set_conv(vae.post_quant_conv, {(0, 0): torch.eye(latent)})
    to_pairs = torch.zeros(decoder.conv_in.out_channels, latent)
    to_pairs[:, :COLOURS] = _pair_embedding(decoder.conv_in.out_channels, groups, COLOURS) * (SIGNAL / gain)
    _set_conv(decoder.conv_in, {(1, 1): to_pairs})
    weights = _share_pair_norm(decoder.conv_norm_out, COLOURS)
    _read_pairs(decoder.conv_out, decoder.conv_norm_out, 1.0 / (weights * norm_scale))


@torch.no_grad()
def make_unet_identity(unet) -> None:
    """Set a diffusers `UNet2DConditionModel` to predict its input (unit RMS per channel) as the noise (in place).

    Args:
        unet (diffusers.UNet2DConditionModel): first width >= 2 per GroupNorm group of `conv_norm_out`.
    """
    groups = unet.conv_norm_out.num_groups
    latent = unet.config.in_channels
    _identity_blocks(unet, groups, latent, downsample_taps=(1, 1), keep_features=True)
    _set_conv(unet.conv_in, {(1, 1): _pair_embedding(unet.conv_in.out_channels, groups, latent)})
    weights = _share_pair_norm(unet.conv_norm_out, latent)
    _read_pairs(unet.conv_out, unet.conv_norm_out, 1.0 / weights)


__all__ = ["make_unet_identity", "make_vae_reconstruct"]
