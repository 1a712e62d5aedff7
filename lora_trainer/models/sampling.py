"""Sample images through any ModelAdapter (previews during training, the demo's before/after grid).

The sampler math is diffusers' Euler scheduler, built from the adapter's own training schedule so that the
same code serves checkpoints of every tree (diffusers, ldm, the WebUI's model).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from lora_trainer.models.adapter import ModelAdapter


@dataclass(frozen=True)
class SampleSettings:
    """What to render.

    Attributes:
        width (int): image width in pixels, a multiple of 8.
        height (int): image height in pixels, a multiple of 8.
        steps (int, optional): sampler steps, defaults to 20.
        guidance_scale (float, optional): classifier-free guidance, defaults to 7.0.
        negative_prompt (str, optional): defaults to "".
        clip_skip (int, optional): defaults to 1.
        max_token_length (int, optional): defaults to 75.
    """

    width: int
    height: int
    steps: int = 20
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    clip_skip: int = 1
    max_token_length: int = 75


def scheduler_for(adapter: ModelAdapter) -> EulerDiscreteScheduler:
    """An Euler scheduler whose betas reproduce `adapter.alphas_cumprod` exactly."""
    alphas_cumprod = adapter.alphas_cumprod.double()
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return EulerDiscreteScheduler(
        num_train_timesteps=len(alphas_cumprod),
        trained_betas=(1 - alphas).float().numpy(),
        prediction_type=adapter.prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


@torch.no_grad()
def sample_images(adapter: ModelAdapter, prompts: list[str], seed: int, settings: SampleSettings) -> list[Image.Image]:
    """Render one image per prompt with the same starting noise for each (seeded from `seed`).

    Args:
        adapter (ModelAdapter): the model, with any LoRA already applied.
        prompts (list[str]): one image each.
        seed (int): initial noise seed; the same seed gives the same image.
        settings (SampleSettings): size, steps, guidance.

    Returns:
        list[PIL.Image.Image]: RGB images.
    """
    images = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((1, 4, settings.height // 8, settings.width // 8), generator=generator)
        images.append(_to_pil(_denoise(adapter, prompt, latents, settings))[0])
    return images


def _denoise(adapter: ModelAdapter, prompt: str, latents: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    scheduler = scheduler_for(adapter)
    scheduler.set_timesteps(settings.steps)
    cond = adapter.encode_captions(
        [settings.negative_prompt, prompt], clip_skip=settings.clip_skip, max_token_length=settings.max_token_length
    )
    cond = cond.to(adapter.device, adapter.dtype)
    size_cond = None
    if adapter.architecture == "sdxl":
        h, w = settings.height, settings.width
        size_cond = torch.tensor([[h, w, 0, 0, h, w]] * 2, device=adapter.device, dtype=adapter.dtype)
    latents = latents.to(adapter.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        timesteps = torch.full((2,), int(t), device=adapter.device, dtype=torch.long)
        uncond_out, cond_out = adapter.predict(model_in.to(adapter.dtype), timesteps, cond, size_cond).float().chunk(2)
        guided = uncond_out + settings.guidance_scale * (cond_out - uncond_out)
        latents = scheduler.step(guided, t, latents).prev_sample
    return adapter.decode_latents(latents.to(adapter.dtype)).float().cpu()


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste equally sized images into a grid, one list per row."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid
