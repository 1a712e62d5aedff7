"""The grid's renderer outside the WebUI: the adapter's own sampler loop (`models.sampling`) with a diffusers
scheduler chosen by name."""
from __future__ import annotations

from PIL import Image

from lora_trainer.grids.plan import Render, RenderSettings
from lora_trainer.models.sampling import SampleSettings, resolve_sampler, sample_images


def adapter_renderer(adapter, max_token_length: int = 75) -> Render:
    """A `render` callable over a ModelAdapter.

    Args:
        adapter (ModelAdapter): the loaded model (any LoRA the grid applies acts on it).
        max_token_length (int, optional): 75/150/225, defaults to 75.

    Returns:
        Render: `(prompt, negative, seed, settings) -> PIL.Image.Image`; an unknown sampler name raises
        ConfigError listing the known ones.
    """

    def render(prompt: str, negative: str, seed: int, settings: RenderSettings) -> Image.Image:
        resolve_sampler(settings.sampler)
        sample = SampleSettings(width=settings.width, height=settings.height, steps=settings.steps,
                                guidance_scale=settings.cfg_scale, negative_prompt=negative,
                                clip_skip=settings.clip_skip, max_token_length=max_token_length,
                                sampler=settings.sampler)
        return sample_images(adapter, [prompt], seed=seed, settings=sample)[0]

    return render


__all__ = ["adapter_renderer"]
