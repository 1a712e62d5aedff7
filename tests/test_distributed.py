"""Data-parallel training under `accelerate launch`: two CPU processes (gloo) train the LoRA one process trains at
the same total batch, only the first process writes, and a state saved by two processes resumes in one."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.__main__ import main
from lora_trainer.networks import load_lora
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.distributed import ProcessGroup, process_share

pytestmark = pytest.mark.usefixtures("single_thread")

TOTAL_BATCH = 4


def write_config(path: Path, tiny, dataset: Path, output: Path, batch: int) -> Path:
    path.write_text(
        f'pretrained_model_name_or_path = "{tiny.checkpoint}"\n'
        f'diffusers_config_dir = "{tiny.config_dir}"\n'
        f'tokenizer_dir = "{tiny.tokenizer_dir}"\n'
        f'train_data_dir = "{dataset}"\noutput_dir = "{output}"\nlogging_dir = "{output / "logs"}"\n'
        'output_name = "dp"\nresolution = "64,64"\nnetwork_dim = 4\nnetwork_alpha = 2\n'
        # plain SGD: a gradient summed twice or weighted wrongly changes the result (Adam would hide the scale)
        'optimizer_type = "SGDNesterov"\nlearning_rate = 1.0\n'
        f'train_batch_size = {batch}\nmax_train_steps = 3\nsave_every_n_steps = 2\nsave_state = true\n'
        'cache_latents = true\nshuffle_caption = true\ncaption_tag_dropout_rate = 0.3\nnoise_offset = 0.05\n'
        'seed = 11\nsave_precision = "float"\n',
        encoding="utf-8",
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(config: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch` as a user runs it; `--multi_gpu` is accelerate's multi-process launcher (its `--cpu`
    alone starts one process), and with `--device cpu` the processes join over gloo."""
    env = {**os.environ, "HF_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "lora_trainer", "train", "--config", str(config), "--device", "cpu", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_lora(path_a: Path, path_b: Path, atol: float = 1e-5) -> None:
    a, meta_a = load_lora(path_a)
    b, _ = load_lora(path_b)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst}"
    assert meta_a["ss_total_batch_size"] == str(TOTAL_BATCH)


@pytest.fixture(scope="module")
def runs(tiny_sd1, tmp_path_factory):
    """One process at batch 4 and two processes at batch 2, same data, seed and steps."""
    root = tmp_path_factory.mktemp("dp")
    dataset = write_square_dataset(root / "data", folder="2_square", count=4, caption="square, red, blue, item{i}")
    one = write_config(root / "one.toml", tiny_sd1, dataset, root / "one", TOTAL_BATCH)
    assert main(["train", "--config", str(one), "--device", "cpu"]) == 0
    two = write_config(root / "two.toml", tiny_sd1, dataset, root / "two", TOTAL_BATCH // 2)
    launched = launch_two(two, root)
    return root, launched


def test_two_processes_train_the_lora_of_one_process_at_the_same_total_batch(runs):
    root, _ = runs
    # the step-2 LoRA (before any rounding in the last step) and the final one
    assert_same_lora(root / "one" / "dp-step00000002.safetensors", root / "two" / "dp-step00000002.safetensors")
    assert_same_lora(root / "one" / "dp.safetensors", root / "two" / "dp.safetensors")
    before, _ = load_lora(root / "two" / "dp-step00000002.safetensors")
    after, _ = load_lora(root / "two" / "dp.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train


def test_only_the_first_process_writes_and_prints(runs):
    root, launched = runs
    assert launched.stdout.count("finished after 3 steps") == 1
    # the plan counts steps of the global batch, said once (the other process logs warnings only)
    said = launched.stdout + launched.stderr
    assert said.count("2 processes x train_batch_size 2 = 4 images per batch") == 1, said[-3000:]
    written = sorted(p.name for p in (root / "two").iterdir())
    assert written == sorted(p.name for p in (root / "one").iterdir())
    assert {"dp.safetensors", "dp-state", "dp-step00000002.safetensors", "logs"} <= set(written)
    log_runs = list((root / "two" / "logs").iterdir())
    assert len(log_runs) == 1
    with open(log_runs[0] / "steps.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 3  # one writer, one row per step


def test_a_state_saved_by_two_processes_resumes_in_one(runs, tiny_sd1):
    root, _ = runs
    config = root / "one.toml"
    resumed_out = root / "resumed"
    text = config.read_text(encoding="utf-8").replace(str(root / "one"), str(resumed_out))
    config = root / "resume.toml"
    config.write_text(text + f'resume = "{root / "two" / "dp-step00000002-state"}"\n', encoding="utf-8")

    assert main(["train", "--config", str(config), "--device", "cpu"]) == 0

    assert_same_lora(root / "one" / "dp.safetensors", resumed_out / "dp.safetensors")


def test_the_shares_of_a_global_batch_cover_it_once():
    for count in range(0, 9):
        for world in (1, 2, 3):
            parts = [process_share(count, rank, world) for rank in range(world)]
            covered = [i for part in parts for i in range(count)[part]]
            assert covered == list(range(count))
            sizes = [part.stop - part.start for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_one_process_group_asks_nothing_of_the_others():
    group = ProcessGroup()
    values = torch.tensor([1.5, 2.0])
    assert group.is_main and group.world_size == 1
    assert torch.equal(group.sum_values(values), values) and group.any(True) and not group.any(False)


def test_a_state_resumes_at_the_same_point_of_its_epoch_under_another_total_batch(runs, caplog):
    root, _ = runs
    out = root / "other_batch"
    text = (root / "two.toml").read_text(encoding="utf-8").replace(str(root / "two"), str(out))
    config = root / "other_batch.toml"  # one process at batch 2: an epoch of 4 steps instead of 2
    config.write_text(text + f'resume = "{root / "two" / "dp-step00000002-state"}"\n', encoding="utf-8")

    with caplog.at_level("INFO", logger="lora_trainer"):
        assert main(["train", "--config", str(config), "--device", "cpu"]) == 0

    assert "2 steps per epoch; this run has 1 process(es) and 4 steps per epoch, so it continues at step 4 of " \
           "epoch 1" in caplog.text
    state = (out / "dp-state" / "train_state.json").read_text(encoding="utf-8")
    assert '"global_step": 3' in state and '"epoch": 1' in state and '"processes": 1' in state
