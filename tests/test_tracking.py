"""The tracker writes JSONL always, and a real (offline) wandb run and TensorBoard event files
when asked."""

import json
import math
import os

import numpy as np
import pytest
import torch

from realm.tracking import (RUN_FILE, TENSORBOARD_DIR, TENSORBOARD_MISSING, Tracker,
                            read_metrics)


def test_jsonl_records_and_cleaning(tmp_path):
    tracker = Tracker(str(tmp_path))
    tracker.log({"loss": torch.tensor(1.5), "acc": np.float32(0.25), "bad": math.nan}, step=3)
    tracker.log_table("examples", ["a", "b"], [[1, "x"]], step=3)
    tracker.log({"loss": 1.0}, step=4)
    tracker.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [3, 4]
    assert records[0]["loss"] == 1.5 and records[0]["acc"] == 0.25 and records[0]["bad"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["rows"] == [[1, "x"]]


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(str(tmp_path / "run"), enabled=False)
    tracker.log({"loss": 1.0}, step=1)
    tracker.close()
    assert not (tmp_path / "run").exists()


def _offline_runs(wandb_dir):
    return sorted(p for p in (wandb_dir / "wandb").iterdir() if p.name.startswith("offline-run-"))


def test_wandb_offline_run_is_written_beside_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")  # no user setting: wandb's files go into the run directory
    run_dir = tmp_path / "pretrain-a"
    tracker = Tracker(str(run_dir), config={"seed": 1}, wandb=True, wandb_mode="offline",
                      run_name="trainer", group="pretrain-a")
    tracker.log({"loss": 2.0}, step=1)
    tracker.log_table("examples", ["text"], [["hello"]], step=1)
    tracker.close()
    runs = _offline_runs(run_dir)
    assert len(runs) == 1
    assert any(name.endswith(".wandb") for name in os.listdir(runs[0]))
    identity = json.loads((run_dir / RUN_FILE).read_text())
    assert identity["group"] == "pretrain-a" and identity["name"] == "trainer"
    assert runs[0].name.endswith("-" + identity["id"]) and len(identity["id"]) == 16
    assert read_metrics(str(run_dir))[0]["loss"] == 2.0


def test_wandb_honours_wandb_dir_and_resume_keeps_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    run_dir = tmp_path / "run"
    ids = []
    for step in (1, 2):  # the run, then its resumption
        tracker = Tracker(str(run_dir), wandb=True, wandb_mode="offline", group="g")
        assert tracker._wandb.group == "g"
        tracker.log({"loss": 1.0 / step}, step=step)
        tracker.close()
        ids.append(json.loads((run_dir / RUN_FILE).read_text())["id"])
    assert ids[0] == ids[1]
    assert not (run_dir / "wandb").exists()
    runs = _offline_runs(tmp_path / "user")
    assert len(runs) == 2 and all(f"-{ids[0]}" in r.name for r in runs)
    other = Tracker(str(tmp_path / "other"), wandb=True, wandb_mode="offline")
    other.close()
    assert json.loads((tmp_path / "other" / RUN_FILE).read_text())["id"] != ids[0]


def _event_scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}, events


def test_tensorboard_event_files_hold_the_jsonl_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from realm.config import load_config

    config = load_config(overrides=["logging.trackers=[jsonl, tensorboard]",
                                    f"train.run_dir={tmp_path / 'run'}"])
    assert config.logging.trackers == ["jsonl", "tensorboard"] and not config.logging.wandb
    tracker = Tracker.from_config(config)
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        tracker.log({"loss": rng.normal(5, 1), "ru_by_label/DATE": rng.normal(),
                     "index/generation": step // 2, "bad": math.nan}, step=step)
    tracker.log_table("examples", ["masked_text", "gold"], [["a [MASK] | b", "x"]], step=5)
    tracker.close()
    records = read_metrics(str(tmp_path / "run"))
    scalars, events = _event_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    assert set(scalars) == {"loss", "ru_by_label/DATE", "index/generation"}  # NaN: not a number
    for tag, points in scalars.items():  # TensorBoard keeps float32
        assert points == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in records], tag
    assert events.Tags()["tensors"] == ["examples/text_summary"]


def test_tensorboard_hides_the_steps_a_resumed_run_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    tracker = Tracker(str(run), tensorboard=True)
    for step in range(1, 6):
        tracker.log({"loss": float(step)}, step=step)
    tracker.close()
    resumed = Tracker(str(run), tensorboard=True)  # resumed from the checkpoint of step 3
    assert resumed.truncate_after(3) == 2
    resumed.log({"loss": 40.0}, step=4)
    resumed.close()
    scalars, _ = _event_scalars(run / TENSORBOARD_DIR)
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(str(run))] == scalars["loss"]


def test_default_trackers_and_a_missing_tensorboard_package(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from realm.config import load_config
    from realm.errors import ConfigError

    config = load_config(overrides=[f"train.run_dir={tmp_path / 'run'}"])
    assert config.logging.trackers == ["jsonl"] and not config.logging.wandb
    tracker = Tracker.from_config(config)  # today's behaviour: JSONL alone
    tracker.log({"loss": 1.0}, step=1)
    tracker.close()
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl"]
    wandb_listed = load_config(overrides=["logging.trackers=[wandb]"]).logging
    assert wandb_listed.wandb and wandb_listed.trackers == ["jsonl"]  # one switch: logging.wandb
    with pytest.raises(ConfigError, match=r"logging.trackers\[0\]: invalid value 'tb'"):
        load_config(overrides=["logging.trackers=[tb]"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    for make in (lambda: load_config(overrides=["logging.trackers=[tensorboard]"]),
                 lambda: Tracker(str(tmp_path / "other"), tensorboard=True)):
        with pytest.raises(ConfigError) as err:
            make()
        assert str(err.value) == TENSORBOARD_MISSING and "pip install tensorboard" in str(err.value)
    assert not (tmp_path / "other").exists()


def test_each_run_directory_has_its_own_wandb_group_kept_across_resume(tmp_path):
    from realm.tracking import wandb_group

    a, b = tmp_path / "x" / "pretrain", tmp_path / "y" / "pretrain"  # the default name, twice
    first = wandb_group(str(a))
    assert first.startswith("pretrain-") and wandb_group(str(a)) == first  # kept: resume, refresher
    assert wandb_group(str(b)) != first
    assert (a / "wandb_group").read_text().strip() == first
    assert wandb_group("s3://bucket/runs/pretrain") == "pretrain"  # remote: the name alone
