"""The tracker writes JSONL always and a real (offline) wandb run when asked."""

import json
import math
import os

import numpy as np
import torch

from realm.tracking import RUN_FILE, Tracker, read_metrics


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
