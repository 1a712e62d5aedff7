"""Previews during a training job: saved in the run's sample folder with step, index and strength in the name, and
listed in the job's status with their step, prompt number and strength."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.host.standalone import StandaloneHost
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.job import JobState, TrainingJob
from lora_trainer.ui import train_views as views

pytestmark = pytest.mark.usefixtures("single_thread")


def test_previews_carry_step_prompt_and_strength(tiny_sd1, tmp_path):
    data = write_square_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("square, red --w 32 --h 32 --s 2 --d 3 --strength 0,1\n# a comment\n"
                       "square --w 32 --h 32 --s 2 --d 4\n", encoding="utf-8")
    config = update_config(TrainConfig(), dict(
        pretrained_model_name_or_path=str(tiny_sd1.checkpoint), diffusers_config_dir=str(tiny_sd1.config_dir),
        tokenizer_dir=str(tiny_sd1.tokenizer_dir), train_data_dir=str(data), resolution=(64, 64),
        output_dir=str(tmp_path / "out"), output_name="p", max_train_steps=4, learning_rate=1e-2, seed=7,
        network_dim=4, network_alpha=4, network_train_unet_only=True, sample_every_n_steps=2,
        sample_prompts=str(prompts), sample_sampler="euler_a"))
    status = TrainingJob(config, StandaloneHost(tmp_path / "loras", device="cpu")).run()
    assert status.state is JobState.FINISHED, status.message
    names = [p.rsplit("/", 1)[-1] for p in status.samples]
    assert names == ["p_000002_00_s0.png", "p_000002_01_s1.png", "p_000002_02_s1.png",
                     "p_000004_00_s0.png", "p_000004_01_s1.png", "p_000004_02_s1.png"]
    assert status.sample_infos == [(2, 1, 0.0), (2, 1, 1.0), (2, 2, 1.0), (4, 1, 0.0), (4, 1, 1.0), (4, 2, 1.0)]
    pixels = [np.asarray(Image.open(p)) for p in status.samples]
    assert np.array_equal(pixels[0], pixels[3]), "strength 0 is the base model at every step"
    assert not np.array_equal(pixels[0], pixels[1]), "strength 1 shows the LoRA"
    captions = [caption for _, caption in views.sample_gallery(status)]
    assert captions[:3] == ["step 4 · prompt 1 · strength 0", "step 4 · prompt 1 · strength 1",
                            "step 4 · prompt 2 · strength 1"]
    assert status.to_dict()["sample_infos"][0] == (2, 1, 0.0)
