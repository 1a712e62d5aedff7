"""The event bus delivers in order, survives a broken subscriber (and logs it); commands cross threads."""
from __future__ import annotations

import logging
import threading

from lora_trainer.train.events import EventBus, Failed, Saved, Started, Step, TrainCommands


def test_bus_delivers_to_all_in_order_and_logs_failures(caplog):
    bus, got = EventBus(), []

    def broken(ev):
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    events = [Started(10, 1), Step(1, 10, 1, 0.5, 0.5, 1e-4, 2.0, 4.5), Saved("x.safetensors", 1, 1), Failed("m")]
    with caplog.at_level(logging.ERROR, logger="lora_trainer.train.events"):
        for ev in events:
            bus.emit(ev)
    assert got == events
    failures = [r for r in caplog.records if "subscriber" in r.getMessage()]
    assert len(failures) == 4 and failures[0].exc_info and "subscriber bug" in caplog.text
    bus.unsubscribe(got.append)
    bus.unsubscribe(got.append)  # second removal is harmless
    bus.emit(Started(1, 1))
    assert len(got) == 4


def test_commands_are_seen_across_threads():
    cmds = TrainCommands()
    assert not cmds.stop_requested and not cmds.save_requested
    t = threading.Thread(target=cmds.stop_and_save)
    t.start()
    t.join()
    assert cmds.stop_requested and cmds.save_requested
    cmds.clear()
    cmds.stop()
    assert cmds.stop_requested and not cmds.save_requested
