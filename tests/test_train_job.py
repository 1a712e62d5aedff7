"""The training job service on the tiny SD1 model with the standalone host: status polling, stop with and without
saving, errors as a failed status, the live LoRA, one job at a time."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.errors import TrainingError
from lora_trainer.host import StandaloneHost, StandaloneJobHandle
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.job import JobManager, JobState, TrainingJob

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("job_data"))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One host for the module: the tiny model is loaded once and reused by every job."""
    return StandaloneHost(tmp_path_factory.mktemp("loras"), device="cpu")


def _config(tiny, data, out=None, **values) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(tiny.checkpoint), diffusers_config_dir=str(tiny.config_dir),
        tokenizer_dir=str(tiny.tokenizer_dir), train_data_dir=str(data), resolution=(64, 64), output_name="t",
        max_train_steps=4, learning_rate=1e-3, seed=7, cache_latents=True, train_batch_size=1, network_dim=4,
        network_alpha=4, network_train_unet_only=True, save_precision="float",
    )
    if out is not None:
        base["output_dir"] = str(out)
    base.update(values)
    return update_config(TrainConfig(), base)


class _GatedHost(StandaloneHost):
    """The standalone host whose job handle holds the run at one step until released (a real run, only paused),
    and can press the host's Interrupt there."""

    def __init__(self, base: StandaloneHost, hold_at: int, interrupt: bool = False):
        super().__init__(base.lora_dir(), device="cpu")
        self._cached, self._cached_key = base._cached, base._cached_key
        self.hold_at, self.interrupt = hold_at, interrupt
        self.reached, self.release = threading.Event(), threading.Event()
        self.progress: list[tuple[int, int]] = []

    @contextmanager
    def job(self, title, total_steps):
        host = self

        class Handle(StandaloneJobHandle):
            def progress(self, step, total):
                host.progress.append((step, total))
                if step == host.hold_at:
                    host.reached.set()
                    host.release.wait(30)

            @property
            def interrupted(self):
                return host.interrupt and host.reached.is_set()

        yield Handle(title, total_steps)


def test_run_reports_progress_and_finishes_with_file(tiny_sd1, dataset, host):
    gated = _GatedHost(host, hold_at=2)
    job = TrainingJob(_config(tiny_sd1, dataset), gated).start()
    assert gated.reached.wait(60), job.status().message
    running = job.status()
    gated.release.set()
    final = job.wait(60)

    assert running.state is JobState.RUNNING
    assert running.step == 2 and running.total_steps == 4 and running.loss is not None
    assert running.it_per_s and running.it_per_s > 0 and running.eta_s is not None
    assert final.state is JobState.FINISHED, final.message
    assert final.step == 4 and [s for s, _ in final.losses] == [1, 2, 3, 4]
    assert gated.progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # Step events reach the host's progress display
    # no output_dir in the config: the host's LoRA folder
    assert final.lora_path == str(host.lora_dir() / "t.safetensors")
    assert (host.lora_dir() / "t.safetensors").is_file()
    assert final.saved == [final.lora_path] and final.finished_at >= final.started_at
    # a snapshot is a copy: later changes do not leak into it
    final.losses.clear()
    assert len(job.status().losses) == 4


@pytest.mark.parametrize("save", [True, False])
def test_stop_mid_run(tiny_sd1, dataset, host, tmp_path, save):
    gated = _GatedHost(host, hold_at=2)
    job = TrainingJob(_config(tiny_sd1, dataset, tmp_path, max_train_steps=50), gated).start()
    assert gated.reached.wait(60), job.status().message
    job.stop(save=save)
    assert job.status().state is JobState.STOPPING
    gated.release.set()
    final = job.wait(60)

    assert final.state is JobState.STOPPED, final.message
    assert final.step == 2
    assert (tmp_path / "t.safetensors").is_file() is save
    assert (final.lora_path == str(tmp_path / "t.safetensors")) if save else final.lora_path is None
    assert job.live_lora is not None  # the trained network stays in memory either way


def test_host_interrupt_stops_and_saves(tiny_sd1, dataset, host, tmp_path):
    gated = _GatedHost(host, hold_at=1, interrupt=True)
    gated.release.set()
    final = TrainingJob(_config(tiny_sd1, dataset, tmp_path, max_train_steps=50), gated).run()
    assert final.state is JobState.STOPPED, final.message
    assert final.step == 1 and final.lora_path == str(tmp_path / "t.safetensors")
    assert (tmp_path / "t.safetensors").is_file()


def test_missing_dataset_fails_with_message_naming_it(tiny_sd1, host, tmp_path):
    missing = tmp_path / "no_such_dataset"
    status = TrainingJob(_config(tiny_sd1, missing, tmp_path), host).run()
    assert status.state is JobState.FAILED
    assert str(missing) in status.message
    assert status.finished_at is not None
    assert not list(tmp_path.glob("*.safetensors"))


def test_missing_checkpoint_fails_with_message(tiny_sd1, dataset, tmp_path):
    config = _config(tiny_sd1, dataset, tmp_path, pretrained_model_name_or_path=str(tmp_path / "none.safetensors"))
    status = TrainingJob(config, StandaloneHost(tmp_path, device="cpu")).run()
    assert status.state is JobState.FAILED and "none.safetensors" in status.message


def test_live_lora_multiplier_and_exact_remove(tiny_sd1, dataset, host, tmp_path):
    job = TrainingJob(_config(tiny_sd1, dataset, tmp_path, max_train_steps=3, learning_rate=1e-2), host)
    assert job.run().state is JobState.FINISHED
    live = job.live_lora
    adapter = host.load(job.config)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    cond = adapter.encode_captions(["square, red"])

    def predict():
        with torch.no_grad():
            return adapter.predict(latents, t, cond).clone()

    base = predict()
    live.apply(adapter)
    live.multiplier = 1.0
    full = predict()
    live.multiplier = 0.5
    half = predict()
    live.multiplier = 0.0
    zero = predict()
    live.remove()
    after = predict()

    assert not torch.allclose(full, base) and not torch.allclose(half, full)
    assert torch.allclose(zero, base, atol=1e-6)
    assert torch.equal(after, base)  # bit-identical once removed
    saved = live.save(tmp_path / "live.safetensors")
    from lora_trainer.networks import load_lora

    state_dict, _ = load_lora(saved)
    assert set(state_dict) == set(load_lora(tmp_path / "t.safetensors")[0])


def test_manager_refuses_a_second_job(tiny_sd1, dataset, host, tmp_path):
    manager = JobManager(host)
    assert manager.current is None and manager.status().state is JobState.IDLE
    first = manager.start(_config(tiny_sd1, dataset, tmp_path, max_train_steps=200))
    try:
        with pytest.raises(TrainingError, match="already"):
            manager.start(_config(tiny_sd1, dataset, tmp_path))
        assert manager.current is first
    finally:
        assert manager.stop(save=False)
        first.wait(60)
    assert manager.current is None and manager.last is first
    assert first.status().state is JobState.STOPPED
    second = manager.start(_config(tiny_sd1, dataset, tmp_path, max_train_steps=1))
    assert second.wait(60).state is JobState.FINISHED


class _SlowGiveBackHost(StandaloneHost):
    """The standalone host that holds the end of a run while it gives the model back, until released."""

    def __init__(self, base: StandaloneHost):
        super().__init__(base.lora_dir(), device="cpu")
        self._cached, self._cached_key = base._cached, base._cached_key
        self.giving_back, self.release = threading.Event(), threading.Event()

    @contextmanager
    def prepare_model(self, config):
        with super().prepare_model(config) as adapter:
            yield adapter
            self.giving_back.set()
            self.release.wait(30)


def test_a_run_is_finished_only_once_the_model_is_given_back_and_the_next_starts_at_once(tiny_sd1, dataset, host,
                                                                                          tmp_path):
    slow = _SlowGiveBackHost(host)
    manager = JobManager(slow)
    first = manager.start(_config(tiny_sd1, dataset, tmp_path, max_train_steps=1))
    try:
        assert slow.giving_back.wait(60), first.status().message
        status = first.status()
        assert status.state is JobState.RUNNING and status.message == "giving the model back"
        assert manager.current is first and status.lora_path  # saved, but the model is still out
    finally:
        slow.release.set()
    while manager.status().state is JobState.RUNNING:  # a client polling the status
        pass
    assert manager.status().state is JobState.FINISHED
    second = manager.start(_config(tiny_sd1, dataset, tmp_path, max_train_steps=1, output_name="t2"))
    assert second.wait(60).state is JobState.FINISHED


def test_live_lora_binds_to_a_reloaded_model(tiny_sd1, dataset, host, tmp_path):
    from lora_trainer.models.loading import load_checkpoint_adapter

    job = TrainingJob(_config(tiny_sd1, dataset, tmp_path, max_train_steps=2, learning_rate=1e-2), host)
    assert job.run().state is JobState.FINISHED
    trained_on = host.load(job.config)
    reloaded = load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                       tokenizer_dir=tiny_sd1.tokenizer_dir, device="cpu", dtype=torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([400])

    def predict(adapter):
        with torch.no_grad():
            return adapter.predict(latents, t, adapter.encode_captions(["square"])).clone()

    base = predict(reloaded)
    live = job.live_lora
    live.multiplier = 0.7
    live.apply(trained_on)
    expected = predict(trained_on)
    live.remove()
    live.apply(reloaded)          # another model object: the weights move onto its modules by kohya name
    got = predict(reloaded)
    live.remove()
    assert not torch.allclose(got, base)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(predict(reloaded), base)


def test_status_says_which_of_epochs_and_steps_wins(tiny_sd1, dataset, host, tmp_path):
    config = _config(tiny_sd1, dataset, tmp_path, max_train_steps=50, max_train_epochs=1)
    status = TrainingJob(config, host).run()
    assert status.state is JobState.FINISHED and status.step == status.total_steps == 4
    assert "4 steps (max_train_epochs = 1 wins over max_train_steps = 50" in status.plan


def test_a_bug_is_reported_as_a_bug(tiny_sd1, dataset, tmp_path):
    class BrokenHost(StandaloneHost):
        def load(self, config):
            raise TypeError("unexpected None")

    status = TrainingJob(_config(tiny_sd1, dataset, tmp_path), BrokenHost(tmp_path, device="cpu")).run()
    assert status.state is JobState.FAILED
    assert "TypeError: unexpected None" in status.message and "This is a bug" in status.message
