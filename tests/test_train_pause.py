"""Pause -> test -> resume on the tiny SD1 model with the standalone host: the losses of a paused run equal those of
a run that never paused (also with a grid rendered and the global RNG drawn from during the pause), stop while
paused, the paused status, and the pause/resume routes' logic."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.errors import TrainingError
from lora_trainer.host import StandaloneHost, StandaloneJobHandle
from lora_trainer.host.a1111_api import TrainApi
from lora_trainer.host.grid_service import IN_MEMORY, IN_MEMORY_EMA, GridRequest, GridService
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.job import JobManager, JobState, TrainingJob

pytestmark = pytest.mark.usefixtures("single_thread")

PAUSE_AT = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("pause_data"))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return StandaloneHost(tmp_path_factory.mktemp("loras"), device="cpu")


def _config(tiny, data, out, **values) -> TrainConfig:
    # network_dropout and shuffled captions draw from the global RNG streams every step
    base = dict(
        pretrained_model_name_or_path=str(tiny.checkpoint), diffusers_config_dir=str(tiny.config_dir),
        tokenizer_dir=str(tiny.tokenizer_dir), train_data_dir=str(data), resolution=(64, 64), output_name="p",
        output_dir=str(out), max_train_steps=6, learning_rate=5e-3, seed=11, cache_latents=True,
        train_batch_size=1, network_dim=4, network_alpha=4, network_train_unet_only=True, save_precision="float",
        network_dropout=0.2, shuffle_caption=True,
    )
    base.update(values)
    return update_config(TrainConfig(), base)


class _PausingHost(StandaloneHost):
    """The standalone host (sharing the loaded tiny model) whose job asks for a pause when step `at` is done."""

    def __init__(self, base: StandaloneHost, at: int):
        super().__init__(base.lora_dir(), device="cpu")
        self._cached, self._cached_key = base._cached, base._cached_key
        self.at, self.job_to_pause = at, None

    @contextmanager
    def job(self, title, total_steps):
        host = self

        class Handle(StandaloneJobHandle):
            def progress(self, step, total):
                if step == host.at:
                    host.job_to_pause.pause()

        yield Handle(title, total_steps, lend=self._lend)


def _wait_for(job, state: JobState, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job.status()
        if status.state is state or job.done:
            return status
        time.sleep(0.02)
    raise TimeoutError(job.status())


def _losses(status) -> list[float]:
    return [loss for _, loss in status.losses]


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd1, dataset, host, tmp_path_factory):
    # one thread, as the paused runs (a module fixture is made before the tests' `single_thread`): with two,
    # oneDNN's conv backward is not deterministic and the losses differ in the 7th digit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = TrainingJob(_config(tiny_sd1, dataset, tmp_path_factory.mktemp("plain")), host).run()
    finally:
        torch.set_num_threads(threads)
    assert status.state is JobState.FINISHED, status.message
    return status


def _paused_job(tiny, data, host, out, manager=None, **values):
    pausing = _PausingHost(host, PAUSE_AT)
    config = _config(tiny, data, out, **values)
    if manager is not None:
        manager.host = pausing
        job = pausing.job_to_pause = manager.start(config)
    else:
        job = pausing.job_to_pause = TrainingJob(config, pausing)
        job.start()
    return job, _wait_for(job, JobState.PAUSED)


def test_pause_then_resume_gives_the_losses_of_an_uninterrupted_run(tiny_sd1, dataset, host, tmp_path,
                                                                     uninterrupted):
    job, paused = _paused_job(tiny_sd1, dataset, host, tmp_path)
    assert paused.state is JobState.PAUSED, paused.message
    assert paused.step == PAUSE_AT and "paused after step 3" in paused.message
    assert job.paused and paused.to_dict()["state"] == "paused"
    time.sleep(0.3)
    assert job.status().step == PAUSE_AT  # it really waits
    unet = host._cached.unet()
    assert not any("forward" in m.__dict__ for m in unet.modules())  # the training network is off the model
    assert not unet.training
    # a generation during the pause draws from (and reseeds) the global RNG streams
    torch.manual_seed(1234), random.seed(5), np.random.seed(5)
    torch.rand(100), random.random(), np.random.rand(3)
    assert job.resume()
    final = job.wait(60)

    assert final.state is JobState.FINISHED, final.message
    assert _losses(final) == _losses(uninterrupted)  # exactly: same optimizer, schedule, RNG and data order
    assert job.live_lora is not None and not job.paused


def test_a_grid_during_the_pause_renders_the_lora_and_leaves_the_losses_alone(tiny_sd1, dataset, host, tmp_path,
                                                                              uninterrupted):
    manager = JobManager(host)
    job, paused = _paused_job(tiny_sd1, dataset, host, tmp_path, manager=manager)
    assert paused.state is JobState.PAUSED, paused.message
    service = GridService(manager)
    assert service.snapshot_labels() == [IN_MEMORY]
    outcome = service.run(GridRequest("square, red", strengths=(0.0, 1.0), seeds=(3,), steps=2, width=64,
                                      height=64, sampler_name="Euler a"))
    images = {cell.cell.strength: np.asarray(cell.image) for cell in outcome.result.cells}
    assert not np.array_equal(images[0.0], images[1.0])  # the LoRA trained so far acts on the render
    assert outcome.path is not None and outcome.path.is_file()
    assert manager.resume()
    final = job.wait(60)

    assert final.state is JobState.FINISHED, final.message
    assert _losses(final) == _losses(uninterrupted)
    with pytest.raises(Exception, match="nothing trained|in progress"):
        GridService(JobManager(host)).snapshots()


def test_a_paused_run_with_ema_offers_its_ema_to_grids(tiny_sd1, dataset, host, tmp_path):
    manager = JobManager(host)
    job, paused = _paused_job(tiny_sd1, dataset, host, tmp_path, manager=manager, ema=True, ema_decay=0.5)
    assert paused.state is JobState.PAUSED, paused.message
    service = GridService(manager)
    assert service.snapshot_labels() == [IN_MEMORY, IN_MEMORY_EMA]
    raw, ema = job.live_lora, job.live_lora.ema
    differs = [not torch.equal(a, b) for a, b in zip(raw.network.parameters(), ema.network.parameters())]
    assert any(differs)  # the EMA copy holds the averaged weights, not the raw ones
    job.stop(save=False)
    assert job.wait(60).state is JobState.STOPPED


@pytest.mark.parametrize("save", [True, False])
def test_stop_while_paused_ends_the_run(tiny_sd1, dataset, host, tmp_path, save):
    job, paused = _paused_job(tiny_sd1, dataset, host, tmp_path)
    assert paused.state is JobState.PAUSED, paused.message
    job.stop(save=save)
    final = job.wait(60)

    assert final.state is JobState.STOPPED, final.message
    assert final.step == PAUSE_AT
    assert (tmp_path / "p.safetensors").is_file() is save
    assert not job.resume()  # nothing left to resume


class _ModelSwappingHost(_PausingHost):
    """A host that cannot give the model back after the pause (as the WebUI when another checkpoint was loaded)."""

    @contextmanager
    def job(self, title, total_steps):
        with super().job(title, total_steps) as handle:
            @contextmanager
            def paused():
                yield handle
                raise TrainingError("host: another checkpoint was loaded during the pause. Load the first again.")

            handle.paused = paused
            yield handle


def test_a_model_that_cannot_be_taken_back_stops_the_run_and_saves(tiny_sd1, dataset, host, tmp_path):
    swapping = _ModelSwappingHost(host, PAUSE_AT)
    job = swapping.job_to_pause = TrainingJob(_config(tiny_sd1, dataset, tmp_path), swapping)
    job.start()
    assert _wait_for(job, JobState.PAUSED).state is JobState.PAUSED
    job.resume()
    final = job.wait(60)

    assert final.state is JobState.STOPPED, final.message
    assert final.step == PAUSE_AT and (tmp_path / "p.safetensors").is_file()


def test_pause_and_resume_routes(tiny_sd1, dataset, host, tmp_path):
    manager = JobManager(host)
    api = TrainApi(manager)
    assert api.pause({})["pause_requested"] is False and api.resume(None)["resume_requested"] is False
    with pytest.raises(ValueError, match="train/pause"):
        api.pause({"now": True})
    job, paused = _paused_job(tiny_sd1, dataset, host, tmp_path, manager=manager, max_train_steps=4)
    assert api.status()["state"] == "paused"
    answer = api.resume({})
    assert answer["resume_requested"] is True
    assert job.wait(60).state is JobState.FINISHED


def test_the_json_log_records_a_pause_without_its_lora_copy():
    from lora_trainer.train.events import Paused, Resumed
    from lora_trainer.train.logs import event_record

    class Unloggable:
        def __deepcopy__(self, memo):
            raise AssertionError("the LoRA copy (bound to the model) must not be copied into a log record")

    record = event_record(Paused(3, 1, lora=Unloggable()))
    assert {k: record[k] for k in ("event", "step", "epoch")} == {"event": "Paused", "step": 3, "epoch": 1}
    assert "lora" not in record
    assert event_record(Resumed(3, True))["stopping"] is True
