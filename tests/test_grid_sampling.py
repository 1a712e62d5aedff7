"""Samplers chosen by name (the WebUI's names and kohya's `sample_sampler`), and kohya sample-prompt lines with
`--ss` and our `--strength`."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
)

from lora_trainer.config import SampleConfig, TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.models.sampling import SampleSettings, resolve_sampler, sample_images, scheduler_for
from lora_trainer.train.samples import SamplePrompt, Sampler, parse_prompt_line


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir)


def _render(adapter, sampler: str, seed: int = 3, guidance: float = 7.0) -> np.ndarray:
    settings = SampleSettings(width=32, height=32, steps=3, sampler=sampler, guidance_scale=guidance)
    return np.asarray(sample_images(adapter, ["square, red"], seed, settings)[0], dtype=np.int16)


def test_names_build_their_schedulers(sd1):
    euler_a = scheduler_for(sd1, "Euler a")
    assert type(euler_a) is EulerAncestralDiscreteScheduler
    assert type(scheduler_for(sd1, "Euler")) is EulerDiscreteScheduler
    assert type(scheduler_for(sd1, "DDIM")) is DDIMScheduler
    karras = scheduler_for(sd1, "DPM++ 2M Karras")
    assert type(karras) is DPMSolverMultistepScheduler
    assert karras.config.use_karras_sigmas and karras.config.algorithm_type == "dpmsolver++"
    assert karras.config.solver_order == 2
    assert not scheduler_for(sd1, "DPM++ 2M").config.use_karras_sigmas
    for kohya, name in (("euler_a", "Euler a"), ("k_euler_a", "Euler a"), ("ddim", "DDIM"), ("k_euler", "Euler"),
                        ("dpmsolver++", "DPM++ 2M"), ("EULER A", "Euler a")):
        assert resolve_sampler(kohya).name == name
    # every scheduler keeps the model's own training schedule
    assert np.allclose(euler_a.alphas_cumprod.numpy(), sd1.alphas_cumprod.numpy(), atol=1e-6)


def test_unknown_sampler_lists_the_known_ones(sd1):
    with pytest.raises(ConfigError, match=r"sampler 'Eulerr': unknown. Use one of: Euler, Euler a, DDIM, .*"
                                          r"DPM\+\+ 2M Karras.*k_euler_a"):
        _render(sd1, "Eulerr")


def test_each_sampler_gives_its_own_image_and_the_same_one_again(sd1, single_thread):
    images = {name: _render(sd1, name) for name in ("Euler", "Euler a", "DPM++ 2M Karras", "DDIM")}
    names = list(images)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not np.array_equal(images[first], images[second]), (first, second)
    for name in ("Euler a", "DDIM"):  # an ancestral sampler draws its step noise from the seed too
        assert np.array_equal(_render(sd1, name), images[name])
    assert not np.array_equal(_render(sd1, "Euler a", seed=4), images["Euler a"])


def test_prompt_line_sampler_and_strengths():
    line = "mychar, smile --n blurry --ss euler_a --strength 0, 0.5,1 --d 7"
    assert parse_prompt_line(line) == SamplePrompt("mychar, smile", "blurry", seed=7, sampler="euler_a",
                                                   strengths=(0.0, 0.5, 1.0))
    assert parse_prompt_line("plain").strengths == (1.0,) and parse_prompt_line("plain").sampler is None
    with pytest.raises(ConfigError, match="--strength 'high'"):
        parse_prompt_line("x --strength high")


def _sampler(tmp_path, adapter, lines: str, sampler: str = "euler_a") -> Sampler:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(lines, encoding="utf-8")
    config = TrainConfig()
    config = dataclasses.replace(config, sample=SampleConfig(sample_every_n_steps=1, sample_prompts=str(prompts),
                                                             sample_sampler=sampler))
    return Sampler(config, adapter, seed=1)


def test_training_samples_use_sample_sampler_and_strengths(tmp_path, sd1, single_thread):
    from lora_trainer.config import NetworkConfig
    from lora_trainer.networks import LoRANetwork

    network = LoRANetwork.create(sd1.lora_targets(), NetworkConfig(network_dim=2, network_alpha=2))
    for param in network.parameters():
        param.data.normal_(std=0.3)
    sampler = _sampler(tmp_path, sd1, "square, red --w 32 --h 32 --s 3 --d 3 --strength 0,1\n")
    network.multiplier = 0.25
    network.apply()
    try:
        base_strength, full = sampler.render(network)
    finally:
        network.remove()
    assert network.multiplier == 0.25  # the run's multiplier is given back
    base = _render(sd1, "Euler a", guidance=7.5)  # kohya's default --l
    assert np.array_equal(np.asarray(base_strength, dtype=np.int16), base)
    assert not np.array_equal(np.asarray(full, dtype=np.int16), base)
    with pytest.raises(ConfigError, match="sampler 'fancy': unknown"):
        _sampler(tmp_path, sd1, "square --ss fancy\n")
    assert _sampler(tmp_path, sd1, "square --ss DDIM\n", sampler="ddim").sampler == "ddim"
