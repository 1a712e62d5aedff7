"""Sample images during training from a kohya prompt file (`prompt --n negative --w 512 --h 512 --s 20 ...`).

Beside kohya's options a line may carry `--strength 0.5,1` (ours): the LoRA strengths to render it at.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.errors import ConfigError
from lora_trainer.models.sampling import scheduler_for

logger = logging.getLogger(__name__)

_OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "scale", "d": "seed", "ss": "sampler",
            "strength": "strengths"}


@dataclass(frozen=True)
class SamplePrompt:
    """One line of a kohya prompt file.

    Attributes:
        prompt (str): the prompt.
        negative (str): `--n`, defaults to "".
        width (int, optional): `--w`, None = training resolution.
        height (int, optional): `--h`, None = training resolution.
        steps (int): `--s`, defaults to 20.
        scale (float): `--l` guidance, defaults to 7.5.
        seed (int, optional): `--d`, None = the run's seed.
        sampler (str, optional): `--ss`, None = the config's `sample_sampler`.
        strengths (tuple[float, ...]): `--strength 0.5,1` (ours), one image per strength, defaults to (1.0,).
    """

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    scale: float = 7.5
    seed: int | None = None
    sampler: str | None = None
    strengths: tuple[float, ...] = (1.0,)


def _strengths(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.replace(" ", "").split(",") if v)


def parse_prompt_line(line: str) -> SamplePrompt | None:
    """Parse `a prompt --n bad --w 512 --h 768 --s 28 --l 7 --d 42 --ss euler_a --strength 0.5,1`; comments and
    blank lines give None. The sampler name is checked when samples are rendered (`resolve_sampler`).

    Args:
        line (str): one line.

    Returns:
        SamplePrompt | None: the prompt.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.split(" --")
    values: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag not in _OPTIONS:
            logger.warning("sample prompt option --%s is not supported and is ignored", flag)
            continue
        field_name = _OPTIONS[flag]
        caster = {"negative": str, "sampler": str, "scale": float, "strengths": _strengths}.get(field_name, int)
        try:
            values[field_name] = caster(value.strip())
        except ValueError as exc:
            raise ConfigError(f"sample_prompts: --{flag} {value!r} in {line!r} is not a number. Fix the line.") from exc
    if not values.get("strengths", (1.0,)):
        raise ConfigError(f"sample_prompts: --strength in {line!r} lists no value. Write e.g. --strength 0.5,1.")
    return SamplePrompt(**values)


def read_prompt_file(path: str) -> list[SamplePrompt]:
    """Read a kohya `.txt` prompt file, one prompt per line.

    Args:
        path (str): `sample_prompts`.

    Returns:
        list[SamplePrompt]: the prompts.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sample_prompts: {path} does not exist. Point it at a .txt file with one prompt per line.")
    prompts = [p for p in map(parse_prompt_line, file.read_text(encoding="utf-8").splitlines()) if p is not None]
    if not prompts:
        raise ConfigError(f"sample_prompts: {path} holds no prompt. Write one prompt per line.")
    return prompts


def sample_file_name(output_name: str, step: int, index: int, info=None) -> str:
    """A preview's file name in the run's `sample` folder: name, step, image index and strength
    (`mychar_000100_01_s0.5.png`), so a folder of previews sorts by step and says each image's strength.

    Args:
        output_name (str): the run's output name.
        step (int): global step.
        index (int): the image's place among this step's images.
        info (SampleInfo, optional): the image's prompt and strength, defaults to None (no strength in the name).

    Returns:
        str: the file name.
    """
    strength = f"_s{info.strength:g}" if info is not None else ""
    return f"{output_name}_{step:06d}_{index:02d}{strength}.png"


class Sampler:
    """Renders the prompt file with the config's `sample_sampler` (or a line's `--ss`), the LoRA applied and in eval
    mode; a line with `--strength` gives one image per strength.

    Args:
        config (TrainConfig): sample and dataset settings.
        adapter (ModelAdapter): the model.
        seed (int): fallback seed.
    """

    def __init__(self, config, adapter, seed: int):
        sample = config.sample
        self.every_steps = sample.sample_every_n_steps or 0
        self.every_epochs = sample.sample_every_n_epochs or 0
        self.prompts = read_prompt_file(sample.sample_prompts) if sample.sample_prompts else []
        if (self.every_steps or self.every_epochs) and not self.prompts:
            logger.warning("sample_every_n_* is set but sample_prompts is not; no samples are rendered")
        self.sampler = sample.sample_sampler or "ddim"
        if self.prompts:  # an unknown or unusable sampler fails now, not at the first sample
            for name in {self.sampler, *(p.sampler for p in self.prompts if p.sampler)}:
                scheduler_for(adapter, name)
        self.adapter = adapter
        self.seed = seed
        self.size = tuple(config.dataset.resolution)
        self.clip_skip = config.model.clip_skip
        self.max_token_length = config.model.max_token_length

    def due(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether a step (or the end of an epoch) asks for samples."""
        if not self.prompts:
            return False
        if step is not None:
            return bool(self.every_steps) and step % self.every_steps == 0
        return bool(self.every_epochs) and epoch is not None and epoch % self.every_epochs == 0

    def image_infos(self) -> list:
        """What each image of `render` shows, in the same order: prompt number (1-based) and strength.

        Returns:
            list[SampleInfo]: one per image.
        """
        from lora_trainer.train.events import SampleInfo

        return [SampleInfo(number, strength, p.prompt)
                for number, p in enumerate(self.prompts, start=1) for strength in p.strengths]

    def render(self, network) -> list:
        """Render every prompt at each of its strengths; the network goes back to train mode and its multiplier
        afterwards.

        Args:
            network (LoRANetwork): the applied network.

        Returns:
            list[PIL.Image.Image]: per prompt, one image per strength, in file order.
        """
        was_training, multiplier = network.training, network.multiplier
        network.eval()
        try:
            with torch.random.fork_rng():  # sampling must not shift the training RNG streams
                return [image for p in self.prompts for image in self._render_one(p, network)]
        finally:
            network.multiplier = multiplier
            network.train(was_training)

    def _render_one(self, p: SamplePrompt, network) -> list:
        from lora_trainer.models.sampling import SampleSettings, sample_images

        settings = SampleSettings(
            width=p.width or self.size[0], height=p.height or self.size[1], steps=p.steps, guidance_scale=p.scale,
            negative_prompt=p.negative, clip_skip=self.clip_skip, max_token_length=self.max_token_length,
            sampler=p.sampler or self.sampler,
        )
        images = []
        for strength in p.strengths:
            network.multiplier = strength
            images.extend(sample_images(self.adapter, [p.prompt], seed=self.seed if p.seed is None else p.seed,
                                        settings=settings))
        return images
