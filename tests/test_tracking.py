"""The tracker writes JSONL always and a real (offline) wandb run when asked."""

import json
import math
import os

import numpy as np
import torch

from realm.tracking import Tracker, read_metrics


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


def test_wandb_offline_run_is_written(tmp_path):
    tracker = Tracker(str(tmp_path), config={"seed": 1}, wandb=True, wandb_mode="offline")
    tracker.log({"loss": 2.0}, step=1)
    tracker.log_table("examples", ["text"], [["hello"]], step=1)
    tracker.close()
    runs = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(name.endswith(".wandb") for name in os.listdir(runs[0]))
    assert read_metrics(str(tmp_path))[0]["loss"] == 2.0
