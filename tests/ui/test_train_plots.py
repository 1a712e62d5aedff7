"""The Train panel's loss plot rows (training, its average, validation in total and per folder), its captioned
preview gallery and its validation fields, without a browser."""
from __future__ import annotations

import math

from lora_trainer.config import TrainConfig
from lora_trainer.train.job import JobState, JobStatus
from lora_trainer.ui import train_views as views


def _series(rows: dict, name: str) -> list[tuple[int, float]]:
    return [(step, loss) for step, loss, series in zip(rows["step"], rows["loss"], rows["series"]) if series == name]


def test_training_and_validation_losses_are_series_of_one_plot():
    status = JobStatus(total_steps=6, total_epochs=2, losses=[(s, float(s)) for s in range(1, 7)],
                       validation_losses=[(3, 0.9), (6, 0.7)],
                       validation_concept_losses=[(3, {"red": 1.0, "green": 0.8}), (6, {"red": 0.6, "green": 0.8})])
    rows = views.loss_rows(status)
    assert set(rows["series"]) == {"training", "training (average)", "validation", "validation: green",
                                   "validation: red"}
    assert _series(rows, "training") == [(s, float(s)) for s in range(1, 7)]
    # the average runs over one epoch (3 steps here), as the status line's "avg"
    assert _series(rows, "training (average)") == [(1, 1.0), (2, 1.5), (3, 2.0), (4, 3.0), (5, 4.0), (6, 5.0)]
    assert _series(rows, "validation") == [(3, 0.9), (6, 0.7)]
    assert _series(rows, "validation: red") == [(3, 1.0), (6, 0.6)]
    assert _series(rows, "validation: green") == [(3, 0.8), (6, 0.8)]


def test_one_concept_folder_is_the_total_and_missing_values_are_left_out():
    status = JobStatus(total_steps=2, total_epochs=1, losses=[(1, 0.5), (2, math.nan)],
                       validation_losses=[(1, math.inf), (2, 0.4)], validation_concept_losses=[(2, {"red": 0.4})])
    rows = views.loss_rows(status)
    assert _series(rows, "validation") == [(2, 0.4)] and _series(rows, "training") == [(1, 0.5)]
    assert not any(series.startswith("validation:") for series in rows["series"])


def test_gallery_shows_the_newest_step_first_with_step_prompt_and_strength():
    status = JobStatus(samples=["a10_0.png", "a10_1.png", "a10_2.png", "a20_0.png", "a20_1.png", "a20_2.png"],
                       sample_infos=[(10, 1, 0.0), (10, 1, 0.5), (10, 2, 1.0), (20, 1, 0.0), (20, 1, 0.5),
                                     (20, 2, 1.0)])
    assert views.sample_gallery(status) == [
        ("a20_0.png", "step 20 · prompt 1 · strength 0"), ("a20_1.png", "step 20 · prompt 1 · strength 0.5"),
        ("a20_2.png", "step 20 · prompt 2 · strength 1"), ("a10_0.png", "step 10 · prompt 1 · strength 0"),
        ("a10_1.png", "step 10 · prompt 1 · strength 0.5"), ("a10_2.png", "step 10 · prompt 2 · strength 1")]
    assert [path for path, _ in views.sample_gallery(status, limit=4)] == ["a20_0.png", "a20_1.png", "a20_2.png",
                                                                         "a10_2.png"]
    assert views.sample_caption(30, 0, None) == "step 30"


def test_validation_fields_reach_the_config_and_come_back():
    values = dict(zip(views.FORM_KEYS, views.config_to_form(TrainConfig())))
    assert values["validation_split"] == 0.0 and values["validate_every_n_epochs"] == ""
    values.update(validation_split=0.25, validation_seed="5", validate_every_n_steps="10", max_validation_steps="3")
    config = views.form_to_config(None, "/d", [values[key] for key in views.FORM_KEYS])
    t = config.training
    assert (t.validation_split, t.validation_seed, t.validate_every_n_steps, t.max_validation_steps) == (0.25, 5, 10, 3)
    assert t.validate_every_n_epochs is None
    shown = dict(zip(views.FORM_KEYS, views.config_to_form(config)))
    assert (shown["validation_split"], shown["validation_seed"], shown["validate_every_n_steps"]) == (0.25, "5", "10")


def test_status_text_names_the_lowest_validation_loss():
    status = JobStatus(JobState.RUNNING, validation_losses=[(2, 0.5), (4, 0.3), (6, 0.4)])
    assert "validation loss 0.4000 at step 6 (lowest 0.3000 at step 4)" in views.status_markdown(status)
