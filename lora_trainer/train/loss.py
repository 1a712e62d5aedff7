"""The diffusion loss: eps or v target, per-sample MSE, min-SNR and debiased-estimation weighting."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_trainer.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
SNR_CAP = 1000.0  # kohya caps the SNR at 1000 for debiased estimation (t = 0 would give inf)


@dataclass(frozen=True)
class LossOptions:
    """How the loss is weighted.

    Attributes:
        prediction_type (str): "epsilon" or "v_prediction".
        min_snr_gamma (float, optional): min-SNR gamma (https://arxiv.org/abs/2303.09556), None = off.
        debiased_estimation (bool): weight by 1/sqrt(snr) (eps) or 1/(snr+1) (v) (https://arxiv.org/abs/2310.08442).
    """

    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return values.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio `ac / (1 - ac)` per timestep.

    Args:
        timesteps (torch.Tensor): `[B]` integer timesteps.
        alphas_cumprod (torch.Tensor): `[1000]` cumulative alphas.

    Returns:
        torch.Tensor: `[B]` float32.
    """
    ac = _per_sample(alphas_cumprod, timesteps)
    return ac / (1.0 - ac)


def compute_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet should predict: the noise (eps) or `v = sqrt(ac) * noise - sqrt(1 - ac) * latents`.

    Args:
        latents (torch.Tensor): `[B,...]` clean latents.
        noise (torch.Tensor): the noise that was added.
        timesteps (torch.Tensor): `[B]` integer timesteps.
        alphas_cumprod (torch.Tensor): `[1000]` cumulative alphas.
        prediction_type (str): "epsilon" or "v_prediction".

    Returns:
        torch.Tensor: float32 target like `latents`.
    """
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        ac = _per_sample(alphas_cumprod, timesteps).to(latents.device).view(-1, *([1] * (latents.dim() - 1)))
        return ac.sqrt() * noise.float() - (1.0 - ac).sqrt() * latents.float()
    raise ConfigError(f"prediction_type: {prediction_type!r} is not one of {PREDICTION_TYPES}. "
                      "Set v_parameterization for v-prediction models, leave it off otherwise.")


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min(snr, gamma) / snr for eps, min(snr, gamma) / (snr + 1) for v (kohya's rule).

    Args:
        snr_t (torch.Tensor): `[B]` SNR.
        gamma (float): min-SNR gamma (kohya recommends 5).
        v_prediction (bool): the model predicts v.

    Returns:
        torch.Tensor: `[B]` weights.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if v_prediction else clipped / snr_t


def debiased_weight(snr_t: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """1 / sqrt(snr) for eps, 1 / (snr + 1) for v, with snr capped at 1000 (kohya's rule).

    Args:
        snr_t (torch.Tensor): `[B]` SNR.
        v_prediction (bool): the model predicts v.

    Returns:
        torch.Tensor: `[B]` weights.
    """
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return 1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt()


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    options: LossOptions,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample weighted MSE, averaged over the batch (kohya's order: loss weights, min-SNR, debiased).

    Args:
        pred (torch.Tensor): `[B,...]` UNet output.
        target (torch.Tensor): `[B,...]` from `compute_target`.
        timesteps (torch.Tensor): `[B]` integer timesteps.
        alphas_cumprod (torch.Tensor): `[1000]` cumulative alphas.
        options (LossOptions): weighting.
        loss_weights (torch.Tensor, optional): `[B]` per-sample weights (prior_loss_weight for reg images).

    Returns:
        torch.Tensor: scalar float32 loss.
    """
    loss = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, torch.float32)
    v_pred = options.prediction_type == "v_prediction"
    if options.min_snr_gamma or options.debiased_estimation:
        snr_t = snr(timesteps, alphas_cumprod).to(loss.device)
        if options.min_snr_gamma:
            loss = loss * min_snr_weight(snr_t, float(options.min_snr_gamma), v_pred)
        if options.debiased_estimation:
            loss = loss * debiased_weight(snr_t, v_pred)
    return loss.mean()
