"""Cost of one EMA update of the LoRA weights (`LoraEma.update`, what the loop runs after an optimizer step with
`ema = true`), alone, on two parameter sets:

    tiny      the LoRA the tests train: the tiny SD1 model (lora_trainer.testing.build_tiny_model), rank 4, UNet + TE
    sd1_r16   a full-size SD1 LoRA, rank 16 / alpha 8, UNet + TE (kohya's 192 + 72 targets), weights random; the
              model itself is built on the `meta` device, so no checkpoint is needed

on every device available (CPU, and CUDA when present: the EMA on the GPU, and on the CPU with `ema_device = "cpu"`).
Also the time to write the EMA file's tensors (`kohya_state_dict`, the swap in and out), and for the tiny model the
median training step with the EMA off, for scale. Times are medians over `--repeats` calls after a warm-up.
Nothing here asserts a timing.

    python benchmarks/ema_speed.py
    python benchmarks/ema_speed.py --repeats 200 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _full_sd1_network(dim: int):
    """A LoRA network over meta-device stand-ins of the full-size SD1 targets; weights materialised on the CPU."""
    from lora_trainer.config import TrainConfig, update_config
    from lora_trainer.networks import LoRANetwork
    from lora_trainer.tools.architectures import architecture_modules

    table = architecture_modules("sd1")
    targets: dict[str, dict[str, nn.Module]] = {"unet": {}, "te": {}}
    for name in sorted(table.lora_targets):
        shape = table.shapes[name]
        module = (nn.Linear(shape[1], shape[0], device="meta") if len(shape) == 2
                  else nn.Conv2d(shape[1], shape[0], shape[2:], device="meta"))
        targets["unet" if name.startswith("lora_unet_") else "te"][name] = module
    network = LoRANetwork.create(targets, update_config(TrainConfig(), {"network_dim": dim,
                                                                         "network_alpha": dim / 2}).network)
    network.to_empty(device="cpu")
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.01)
    return network


def _tiny_network(root: Path):
    from lora_trainer.config import TrainConfig, update_config
    from lora_trainer.models.loading import load_checkpoint_adapter
    from lora_trainer.networks import LoRANetwork
    from lora_trainer.testing.tiny_models import build_tiny_model

    tiny = build_tiny_model("sd1", root / "tiny")
    adapter = load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir,
                                      device="cpu", dtype=torch.float32)
    network = LoRANetwork.create(adapter.lora_targets(False), update_config(TrainConfig(), {"network_dim": 4}).network)
    return network, tiny


def _median_s(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(label: str, network, device: str, ema_device: str, repeats: int) -> None:
    from lora_trainer.train.ema import EmaSettings, LoraEma

    network = network.to(device)
    params = network.trainable_parameters()
    ema = LoraEma(network, params, EmaSettings(0.999, True, 1, ema_device), device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    update = _median_s(ema.update, repeats, sync)
    export = _median_s(lambda: ema.kohya_state_dict(torch.float16), max(3, repeats // 10), sync)
    count = sum(p.numel() for p in params)
    print(f"{label:8s} {device:5s} ema on {ema.device.type:5s} {count / 1e6:8.3f} M params "
          f"({count * 4 / 2**20:7.1f} MiB fp32)  update {update * 1e3:8.3f} ms   "
          f"EMA file tensors {export * 1e3:8.1f} ms")


def _tiny_step_s(tiny, root: Path, steps: int) -> float:
    from lora_trainer.config import config_from_dict
    from lora_trainer.host import StandaloneHost
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.train import EventBus, Step, Trainer

    data = write_square_dataset(root / "data")
    config = config_from_dict({
        "pretrained_model_name_or_path": str(tiny.checkpoint), "diffusers_config_dir": str(tiny.config_dir),
        "tokenizer_dir": str(tiny.tokenizer_dir), "train_data_dir": str(data), "output_dir": str(root / "out"),
        "resolution": "64,64", "network_dim": 4, "max_train_steps": steps, "cache_latents": True, "seed": 1}).config
    stamps: list[float] = []
    bus = EventBus()
    bus.subscribe(lambda e: stamps.append(time.perf_counter()) if isinstance(e, Step) else None)
    with StandaloneHost(root / "loras", device="cpu").prepare_model(config) as adapter:
        Trainer(config, adapter, bus).run()
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dim", type=int, default=16, help="rank of the full-size SD1 LoRA")
    parser.add_argument("--steps", type=int, default=8, help="training steps of the tiny model, for scale")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    cases = [("cpu", "same")] + ([("cuda", "same"), ("cuda", "cpu")] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny_net, tiny = _tiny_network(root)
        for device, ema_device in cases:
            _measure("tiny", tiny_net, device, ema_device, args.repeats)
        full = _full_sd1_network(args.dim)
        for device, ema_device in cases:
            _measure(f"sd1_r{args.dim}", full, device, ema_device, args.repeats)
        if args.steps > 2:
            step = _tiny_step_s(tiny, root, args.steps)
            print(f"tiny model training step (CPU, EMA off), for scale: {step * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
