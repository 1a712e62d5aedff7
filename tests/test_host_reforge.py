"""The reForge host's parts that run without reForge: its main-thread queue (on a real worker loop shaped like
reForge's), the self-test on a key map, and the adapters over the real ldm modules of a
tiny SD1 model (reForge's own ComfyUI classes are covered by tests/forge/test_reforge.py)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from lora_trainer.host.reforge_adapter import ReForgeLdmAdapter, penultimate_only, sample_latents
from lora_trainer.host.reforge_keys import check_names, module_index
from lora_trainer.host.reforge_queue import MainThreadWorker


class WorkerLoop:
    """A task queue run by one thread, as reForge's `main_thread` (`async_run` appends, the loop pops in order)."""

    def __init__(self):
        self.tasks: list = []
        self.ran: list[str] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stopped:
            time.sleep(0.005)
            with self.lock:
                task = self.tasks.pop(0) if self.tasks else None
            if task is not None:
                task[0](*task[1])

    def async_run(self, func, *args):
        with self.lock:
            self.tasks.append((func, args))

    def stop(self):
        self.stopped = True
        self.thread.join(5)


@pytest.fixture()
def worker_loop():
    loop = WorkerLoop()
    yield loop
    loop.stop()


def test_calls_run_on_the_hosts_worker_thread_and_other_tasks_wait_for_the_release(worker_loop):
    worker = MainThreadWorker(lambda: worker_loop)
    with worker.held():
        assert worker.call(threading.get_ident) == worker_loop.thread.ident
        worker_loop.async_run(worker_loop.ran.append, "txt2img")  # sent during the job
        with worker.held():  # re-entrant: prepare_model and job nest
            assert worker.call(lambda a, b=0: a + b, 2, b=3) == 5
        time.sleep(0.05)
        assert worker_loop.ran == []  # the worker is ours until the outer block ends
    deadline = time.time() + 5
    while not worker_loop.ran and time.time() < deadline:
        time.sleep(0.01)
    assert worker_loop.ran == ["txt2img"]
    assert not worker.holding


def test_an_exception_on_the_worker_is_raised_in_the_caller_and_the_queue_is_released(worker_loop):
    worker = MainThreadWorker(lambda: worker_loop)

    def fail():
        raise ValueError("model: broken. Reload it.")

    with pytest.raises(ValueError, match="broken"), worker.held():
        worker.call(fail)
    with worker.held():  # the loop is free again and serves a new hold
        assert worker.call(lambda: "again") == "again"


def test_a_call_without_holding_the_queue_is_refused(worker_loop):
    with pytest.raises(RuntimeError, match="outside held"):
        MainThreadWorker(lambda: worker_loop).call(print)


def test_a_pause_frees_the_worker_for_the_hosts_own_tasks_and_takes_it_back(worker_loop):
    worker = MainThreadWorker(lambda: worker_loop)
    with worker.held(), worker.held():  # prepare_model and job
        with worker.released():  # the run is paused
            worker_loop.async_run(worker_loop.ran.append, "txt2img")
            deadline = time.time() + 5
            while not worker_loop.ran and time.time() < deadline:
                time.sleep(0.01)
            assert worker_loop.ran == ["txt2img"]
            with pytest.raises(RuntimeError, match="outside held"):
                worker.call(print)
        assert worker.call(threading.get_ident) == worker_loop.thread.ident  # resumed: ours again
        worker_loop.async_run(worker_loop.ran.append, "later")
        time.sleep(0.05)
        assert worker_loop.ran == ["txt2img"]
    deadline = time.time() + 5
    while len(worker_loop.ran) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert worker_loop.ran == ["txt2img", "later"]


@pytest.fixture(scope="module")
def ldm_model(tiny_sd1):
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    return build_ldm_model(tiny_sd1.yaml, tiny_sd1.checkpoint)


class LatentFormat:
    """The scaling reForge's SD1 `latent_format` does (ComfyUI `latent_formats.SD15`)."""

    scale_factor = 0.18215

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class BaseModel(nn.Module):
    """What the adapter reads of ComfyUI's `BaseModel`: `diffusion_model`, `latent_format`, `manual_cast_dtype`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.latent_format = LatentFormat()
        self.manual_cast_dtype = None


@pytest.fixture(scope="module")
def adapters(ldm_model):
    from lora_trainer.models.ldm_adapter import LdmAdapter

    plain = LdmAdapter(ldm_model, model_id="tiny")
    reforge = ReForgeLdmAdapter(ldm_model, BaseModel(ldm_model.model.diffusion_model), ldm_model.first_stage_model,
                                text_encode=None, model_id="tiny")
    return plain, reforge


def test_sd1_targets_are_the_a1111_adapters_targets_with_the_same_kohya_names(adapters):
    plain, reforge = adapters
    for component in ("unet", "te"):
        ours, theirs = reforge.lora_targets(True)[component], plain.lora_targets(True)[component]
        assert list(ours) == list(theirs) and all(ours[n] is theirs[n] for n in ours)
    assert reforge.architecture == "sd1" and reforge.unet() is plain.unet()


def test_images_are_sampled_from_the_vae_posterior_and_scaled_by_the_latent_format(adapters, ldm_model):
    _plain, reforge = adapters
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        ours = reforge.encode_images(pixels)
        torch.manual_seed(5)
        ldm = ldm_model.first_stage_model.encode(pixels).sample() * 0.18215
        mode = ldm_model.first_stage_model.encode(pixels).mode() * 0.18215
        torch.manual_seed(5)
        unscaled = sample_latents(ldm_model.first_stage_model, pixels)
        decoded = reforge.decode_latents(ours)
    assert torch.equal(ours, ldm) and not torch.equal(ours, mode)
    assert torch.equal(unscaled * 0.18215, ours)
    assert decoded.shape == (1, 3, 64, 64) and decoded.abs().max() <= 1


def test_the_unet_runs_in_the_compute_dtype_of_a_manual_cast_model(adapters, ldm_model):
    from lora_trainer.models.adapter import TextConditioning

    plain, reforge = adapters
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    to_k = next(m for n, m in plain.unet().named_modules() if n.endswith("attn2.to_k"))
    cond = TextConditioning(torch.randn(1, 77, to_k.in_features))
    with torch.no_grad():
        assert torch.equal(reforge.predict(x, t, cond), plain.predict(x, t, cond))
        reforge._base.manual_cast_dtype = torch.float64  # weights stay float32, inputs are cast
        try:
            assert reforge.dtype == torch.float64
        finally:
            reforge._base.manual_cast_dtype = None


def test_a_penultimate_layer_encoder_leaves_its_last_layer_out():
    names = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": nn.Linear(1, 1) for i in range(4)}
    assert list(penultimate_only(names, 4)) == [f"lora_te_text_model_encoder_layers_{i}_mlp_fc1" for i in range(3)]


def test_the_self_test_reports_names_the_host_would_drop_or_put_elsewhere(adapters, ldm_model):
    _plain, reforge = adapters
    targets = reforge.lora_targets(False)["unet"]
    root = ldm_model.model  # DiffusionWrapper: its `diffusion_model.` paths are ComfyUI's BaseModel keys
    paths = {id(m): p for p, m in root.named_modules()}
    key_map = {name: f"{paths[id(module)]}.weight" for name, module in targets.items()}
    index = module_index(root)
    assert check_names(targets, key_map, index).ok
    dropped, moved, other = list(targets)[:3]
    del key_map[dropped]
    key_map[moved] = key_map[other]
    report = check_names(targets, key_map, index)
    assert report.unmatched == [dropped] and report.misplaced == [moved] and report.checked == len(targets)
    # Forge's maps may name a fused weight with its slice: (weight key, (dim, offset, size)); the weight decides
    key_map = {name: (f"{paths[id(module)]}.weight", (0, 0, 1)) for name, module in targets.items()}
    assert check_names(targets, key_map, index).ok


def test_text_encoder_attention_of_older_transformers_is_a_target(ldm_model):
    """reForge's transformers 4.48 builds `CLIPSdpaAttention` modules; they carry q/k/v/out like `CLIPAttention`."""
    from transformers.models.clip.modeling_clip import CLIPAttention

    from lora_trainer.models.naming import TE_PREFIXES, te_targets

    class CLIPSdpaAttention(CLIPAttention):
        pass

    text = ldm_model.cond_stage_model.transformer
    expected = set(te_targets(text, TE_PREFIXES["te"]))
    attention = [m for m in text.modules() if type(m) is CLIPAttention]
    try:
        for module in attention:
            module.__class__ = CLIPSdpaAttention
        assert set(te_targets(text, TE_PREFIXES["te"])) == expected
        assert any(name.endswith("self_attn_q_proj") for name in expected)
    finally:
        for module in attention:
            module.__class__ = CLIPAttention
