"""Log subscribers write what the events say: CSV rows per step, every event as JSON, TensorBoard scalars."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

from PIL import Image

from lora_trainer.train.events import EventBus, Finished, Sample, SampleInfo, Saved, Started, Step
from lora_trainer.train.logs import CsvLogger, JsonLinesLogger, TensorBoardLogger, build_log_subscribers

EVENTS = [
    Started(2, 1),
    Step(1, 2, 1, 0.25, 0.25, 1e-4, 3.0, 0.3),
    Sample(1, [Image.new("RGB", (8, 8), "red")], [SampleInfo(1, 0.5, "a red square")]),
    Step(2, 2, 1, 0.15, 0.2, 5e-5, 3.0, 0.0),
    Saved("out/x.safetensors", 2, 1),
    Finished("out/x.safetensors", False, 2),
]


def _emit(*subscribers):
    bus = EventBus()
    for s in subscribers:
        bus.subscribe(s)
    for ev in EVENTS:
        bus.emit(ev)


def test_csv_and_jsonl(tmp_path):
    _emit(CsvLogger(tmp_path / "a" / "steps.csv"), JsonLinesLogger(tmp_path / "a" / "events.jsonl"))
    rows = list(csv.DictReader((tmp_path / "a" / "steps.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[1]["loss"]) == 0.15 and float(rows[0]["lr"]) == 1e-4
    lines = [json.loads(x) for x in (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["Started", "Step", "Sample", "Step", "Saved", "Finished"]
    assert lines[2]["infos"] == [{"prompt_index": 1, "strength": 0.5, "prompt": "a red square"}]
    assert lines[2]["images"] == 1 and lines[4]["path"] == "out/x.safetensors" and lines[5]["steps"] == 2


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _emit(TensorBoardLogger(tmp_path / "tb"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss/current")] == [0.25, 0.15000000596046448]
    assert [e.step for e in acc.Scalars("lr")] == [1, 2]
    assert acc.Tags()["images"] == ["sample/0"]


def test_build_from_config(tmp_path):
    cfg = SimpleNamespace(log_with="tensorboard", logging_dir=str(tmp_path), log_prefix="p_")
    subs = build_log_subscribers(cfg, "run")
    assert [type(s).__name__ for s in subs] == ["CsvLogger", "CsvLogger", "JsonLinesLogger", "TensorBoardLogger"]
    assert subs[1].path.name == "validation.csv"
    assert subs[0].path.parent.name.startswith("p_run_")
    _emit(*subs)
    assert build_log_subscribers(SimpleNamespace(log_with="tensorboard", logging_dir=None, log_prefix=None), "r") == []
