"""Training noise: offset noise, pyramid (multi-resolution) noise, timesteps and the forward diffusion step.

Random numbers come from an explicit CPU `torch.Generator`, so a run is repeatable on any device and its state
can be saved for resume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.errors import ConfigError


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    out = torch.randn(shape, generator=generator, dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Add `offset * randn(B, C, 1, 1)`: a per-channel shift that teaches very dark/bright images.

    See https://www.crosslabs.org/blog/diffusion-with-offset-noise.

    Args:
        noise (torch.Tensor): `[B,C,H,W]` noise.
        offset (float): strength (kohya `noise_offset`, typically 0.05-0.1).
        generator (torch.Generator, optional): CPU generator.

    Returns:
        torch.Tensor: the shifted noise.
    """
    b, c = noise.shape[:2]
    return noise + offset * _randn((b, c, 1, 1), generator, noise)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Multi-resolution noise: for i in 1..iterations add bilinear-upsampled noise drawn at size / 2**i, weighted
    by discount**i, then rescale to unit std. See https://wandb.ai/johnowhitaker/multires_noise.

    Args:
        noise (torch.Tensor): `[B,C,H,W]` base noise.
        iterations (int): levels (kohya `multires_noise_iterations`, typically 6-10).
        discount (float): weight decay per level (kohya `multires_noise_discount`, typically 0.3).
        generator (torch.Generator, optional): CPU generator.

    Returns:
        torch.Tensor: noise of the same shape with roughly unit std.
    """
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(1, iterations + 1):
        hn, wn = max(1, h // 2**i), max(1, w // 2**i)
        low = torch.randn((b, c, hn, wn), generator=generator, dtype=torch.float32).to(noise.device)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """Noise for a batch of latents, with kohya's optional offset and pyramid noise (in that order).

    Args:
        latents (torch.Tensor): `[B,C,H,W]` latents (shape, device and dtype are copied).
        generator (torch.Generator, optional): CPU generator.
        noise_offset (float, optional): offset strength, defaults to 0 (off).
        multires_iterations (int, optional): pyramid levels, defaults to 0 (off).
        multires_discount (float, optional): pyramid discount, defaults to 0.3.

    Returns:
        torch.Tensor: noise like `latents`.
    """
    noise = _randn(latents.shape, generator, latents)
    if noise_offset:
        noise = offset_noise(noise, noise_offset, generator)
    if multires_iterations:
        noise = pyramid_noise(noise, int(multires_iterations), multires_discount, generator)
    return noise


def sample_timesteps(
    batch_size: int,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform integer timesteps in `[min_timestep, max_timestep)`.

    Args:
        batch_size (int): how many.
        min_timestep (int, optional): lowest, defaults to 0.
        max_timestep (int, optional): exclusive upper bound, defaults to 1000.
        generator (torch.Generator, optional): CPU generator.
        device (torch.device | str, optional): where the result goes, defaults to "cpu".

    Returns:
        torch.Tensor: `[batch_size]` int64.
    """
    lo, hi = int(min_timestep or 0), int(1000 if max_timestep is None else max_timestep)
    if not 0 <= lo < hi <= 1000:
        raise ConfigError(
            f"min_timestep/max_timestep: [{lo}, {hi}) is not a range inside [0, 1000). Use 0 <= min < max <= 1000."
        )
    return torch.randint(lo, hi, (batch_size,), generator=generator).to(device)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return out.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The forward process: `sqrt(ac_t) * latents + sqrt(1 - ac_t) * noise` (computed in float32).

    Args:
        latents (torch.Tensor): `[B,...]` clean latents.
        noise (torch.Tensor): noise like `latents`.
        timesteps (torch.Tensor): `[B]` integer timesteps.
        alphas_cumprod (torch.Tensor): `[1000]` cumulative alphas.

    Returns:
        torch.Tensor: noisy latents in the dtype of `latents`.
    """
    ac = _gather(alphas_cumprod, timesteps, latents)
    noisy = ac.sqrt() * latents.float() + (1.0 - ac).sqrt() * noise.float()
    return noisy.to(latents.dtype)
