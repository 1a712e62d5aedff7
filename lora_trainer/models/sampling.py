"""Sample images through any ModelAdapter (previews during training, strength grids, the demo's before/after grid).

The sampler is a diffusers scheduler chosen by name (the WebUI's names, or kohya's `sample_sampler` values), built
from the adapter's own training schedule so that the same code serves checkpoints of every tree (diffusers, ldm,
the WebUI's model).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from lora_trainer.errors import ConfigError
from lora_trainer.models.adapter import ModelAdapter


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its display name, the diffusers scheduler class and the options that make it that sampler.

    Attributes:
        name (str): the WebUI's name ("Euler a", "DPM++ 2M Karras", ...).
        scheduler (str): the diffusers scheduler class name.
        options (dict): constructor options beyond the noise schedule.
        aliases (tuple[str, ...]): other accepted names (kohya's `sample_sampler` values).
    """

    name: str
    scheduler: str
    options: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


_DPM_PP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SAMPLERS = (
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("euler", "k_euler")),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("euler_a", "k_euler_a")),
    SamplerSpec("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, ("ddim",)),
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", _DPM_PP, ("dpmsolver++",)),
    SamplerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {**_DPM_PP, "use_karras_sigmas": True}),
    SamplerSpec("DPM Solver", "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, ("dpmsolver",)),
    SamplerSpec("DPM Solver single", "DPMSolverSinglestepScheduler", {"lower_order_final": True}, ("dpmsingle",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("dpm_2", "k_dpm_2")),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("dpm_2_a", "k_dpm_2_a")),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("pndm",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("lms", "k_lms")),  # needs scipy
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
)
_BY_NAME = {key.lower(): spec for spec in SAMPLERS for key in (spec.name, *spec.aliases)}


def sampler_names() -> list[str]:
    """The sampler names `resolve_sampler` accepts, display names first, then kohya's aliases."""
    return [s.name for s in SAMPLERS] + [a for s in SAMPLERS for a in s.aliases]


def resolve_sampler(name: str) -> SamplerSpec:
    """The sampler of a name, case-insensitive (a WebUI name or a kohya `sample_sampler` value).

    Args:
        name (str): e.g. "Euler a", "DPM++ 2M Karras", "ddim", "k_euler_a".

    Returns:
        SamplerSpec: the sampler.

    Raises:
        ConfigError: the name is unknown; the message lists the known names.
    """
    spec = _BY_NAME.get(str(name).strip().lower())
    if spec is None:
        raise ConfigError(f"sampler {name!r}: unknown. Use one of: {', '.join(sampler_names())}.")
    return spec


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
        sampler (str, optional): a name `resolve_sampler` knows, defaults to "Euler".
    """

    width: int
    height: int
    steps: int = 20
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    clip_skip: int = 1
    max_token_length: int = 75
    sampler: str = "Euler"


def scheduler_for(adapter: ModelAdapter, sampler: str = "Euler"):
    """The named sampler's diffusers scheduler, with betas that reproduce `adapter.alphas_cumprod` exactly.

    Args:
        adapter (ModelAdapter): gives the training noise schedule and the prediction type.
        sampler (str, optional): a name `resolve_sampler` knows, defaults to "Euler".

    Returns:
        diffusers.SchedulerMixin: a new scheduler (schedulers keep per-run state).

    Raises:
        ConfigError: unknown sampler, or one whose scheduler cannot be built here (LMS without scipy).
    """
    import diffusers

    spec = resolve_sampler(sampler)
    cls = getattr(diffusers, spec.scheduler)
    alphas_cumprod = adapter.alphas_cumprod.double()
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    options = {"num_train_timesteps": len(alphas_cumprod), "trained_betas": (1 - alphas).float().numpy(),
               "prediction_type": adapter.prediction_type, "timestep_spacing": "leading", "steps_offset": 1,
               **spec.options}
    accepted = inspect.signature(cls.__init__).parameters  # e.g. single-step DPM has no timestep_spacing
    try:
        return cls(**{key: value for key, value in options.items() if key in accepted})
    except ImportError as exc:  # diffusers' stand-in class for a scheduler whose dependency is missing
        raise ConfigError(f"sampler {spec.name!r}: cannot be used here ({str(exc).strip()}). Install what it "
                          "names, or choose another sampler.") from exc


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
        images.append(_to_pil(_denoise(adapter, prompt, latents, settings, generator))[0])
    return images


def _denoise(adapter: ModelAdapter, prompt: str, latents: torch.Tensor, settings: SampleSettings,
             generator: torch.Generator) -> torch.Tensor:
    scheduler = scheduler_for(adapter, settings.sampler)
    scheduler.set_timesteps(settings.steps)
    # ancestral samplers draw fresh noise each step: from the seed's generator, so a seed gives one image
    step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
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
        latents = scheduler.step(guided, t, latents, **step_options).prev_sample
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
