"""Resume that never unpickles and never continues another run: the loaders' floors, planted
payloads in accelerate's own files, an RNG state that cannot be read, another corpus or model
shape, and the metrics of a run that left no checkpoint."""

import configparser
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from realm.errors import ResumeError
from realm.tracking import Tracker, read_metrics
from realm.training import checkpoint
from realm.training.accelerator import shutdown
from realm.training.core import TrainSettings, train

from test_core import Regression, TwoParts

REPO = Path(__file__).resolve().parents[2]


def run(run_dir, steps, model=None, origin=None, save_every=2):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    settings = TrainSettings(run_dir=str(run_dir), steps=steps, batch_size=8, lr=1e-2,
                             log_every=1, progress=False, save_every=save_every)
    tracker = Tracker(str(run_dir))
    try:
        return train(model or TwoParts(), Regression(), settings, accelerator, tracker,
                     origin=origin)
    finally:
        tracker.close()
        shutdown(accelerator)


class Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_setup_cfg_floors_are_the_loaders_checked_at_resume():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    floors = dict(re.match(r"([\w-]+)>=([\d.]+)", line.strip()).groups()
                  for line in cfg["options"]["install_requires"].splitlines()
                  if re.match(r"\s*(torch|accelerate)>=", line))
    assert floors == checkpoint.SAFE_LOADERS


def test_a_loader_that_would_unpickle_is_refused_at_resume(tmp_path, monkeypatch):
    run(tmp_path, 2)
    real = checkpoint.installed_version
    monkeypatch.setattr(checkpoint, "installed_version",
                        lambda name: "2.5.1" if name == "torch" else real(name))
    with pytest.raises(ResumeError, match=r"step-000002: not resumed with torch 2\.5\.1 "
                                          r"\(needs >= 2\.6\)"):
        run(tmp_path, 4)
    monkeypatch.setattr(checkpoint, "installed_version", real)
    assert run(tmp_path, 4)["resumed_from"].endswith("step-000002")


def test_planted_payloads_in_accelerates_files_are_never_run(tmp_path, caplog):
    run(tmp_path, 2)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    optimizer = (ckpt / "optimizer.bin").read_bytes()
    (ckpt / "optimizer.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ResumeError, match=r"step-000002: cannot be loaded \(.*Weights only"):
        run(tmp_path, 4)
    assert not marker.exists()
    (ckpt / "optimizer.bin").write_bytes(optimizer)
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with caplog.at_level(logging.INFO):
        result = run(tmp_path, 4)  # resumed, but the RNG state was not read: said loudly
    assert not marker.exists() and result["resumed_from"].endswith("step-000002")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "random_states_0.pkl could not be read" in r.getMessage()]
    assert warned and "not exactly" in warned[0].getMessage()
    assert not any("Could not load random states" in r.getMessage() for r in caplog.records)


def test_another_corpus_or_model_shape_is_refused_naming_both(tmp_path):
    origin = {"stage": "pretrain", "corpus": "/c/one", "corpus_fingerprint": "aaaa"}
    run(tmp_path, 2, origin=origin)
    manifest = json.loads((tmp_path / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert manifest["origin"]["corpus_fingerprint"] == "aaaa"
    assert manifest["origin"]["model_shapes"] and manifest["origin"]["model_tensors"] == 4
    other = {**origin, "corpus": "/c/two", "corpus_fingerprint": "bbbb"}
    with pytest.raises(ResumeError, match=r"made from corpus /c/one \(fingerprint aaaa\), this "
                                          r"run reads /c/two \(fingerprint bbbb\)"):
        run(tmp_path, 4, origin=other)
    with pytest.raises(ResumeError, match="made by stage 'pretrain', this run is 'ict'"):
        run(tmp_path, 4, origin={**origin, "stage": "ict"})
    wider = TwoParts()
    wider.retriever = torch.nn.Linear(4, 8)
    wider.reader = torch.nn.Linear(8, 1)
    with pytest.raises(ResumeError, match=r"other parameter shapes .* first difference: "
                                          r"reader\.weight \[1, 4\] there, \[1, 8\] here"):
        run(tmp_path, 4, model=wider, origin=origin)
    assert run(tmp_path, 4, origin=origin)["resumed_from"].endswith("step-000002")


class FrozenPart(TwoParts):
    """TwoParts whose reader is a frozen pretrained part (its weights drawn from ``seed``, as a
    frozen LM is loaded from its checkpoint), also held under a second name (a tied weight)."""

    def __init__(self, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.reader.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.reader.requires_grad_(False)
        self.tied = self.reader

    def rebuilt_parameters(self):
        return list(self.reader.parameters())


def test_a_frozen_part_is_left_out_of_checkpoints_and_rebuilt_at_resume(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run(tmp_path / "whole", 4, model=FrozenPart())
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # killed before its last checkpoint
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000004")
    ckpt = tmp_path / "cut" / "checkpoints" / "step-000002"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["retriever.bias", "retriever.weight"]
    rebuilt = json.loads((ckpt / "manifest.json").read_text())["rebuilt"]
    assert rebuilt["tensors"] == 4 and rebuilt["fingerprint"]  # reader.*, tied.*
    torch.manual_seed(5)  # another initial retriever: the checkpoint's is loaded over it
    resumed = run(tmp_path / "cut", 4, model=FrozenPart())
    assert resumed["resumed_from"].endswith("step-000002")
    losses = {d: {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / d)) if "loss" in r}
              for d in ("whole", "cut")}
    assert sorted(losses["cut"]) == [1, 2, 3, 4]
    for step in (3, 4):
        assert losses["cut"][step] == pytest.approx(losses["whole"][step], rel=1e-6)

    with pytest.raises(ResumeError, match=r"step-000004: it left out 4 frozen pretrained weights "
                                          r"\(fingerprint \w+\), which this run rebuilds as 4 "
                                          r"\(fingerprint \w+\): the frozen LM is not the one"):
        run(tmp_path / "cut", 6, model=FrozenPart(seed=2))
    model = tmp_path / "cut" / "checkpoints" / "step-000004" / "model.safetensors"
    with safe_open(str(model), "pt") as f:
        save_file({"retriever.bias": f.get_tensor("retriever.bias")}, str(model))
    with pytest.raises(ResumeError, match=r"does not fit this run's model \(missing "
                                          r"\['retriever.weight'\], unexpected \[\]\)"):
        run(tmp_path / "cut", 6, model=FrozenPart())


def test_a_malformed_training_state_or_truncated_model_is_one_line(tmp_path):
    run(tmp_path, 2)
    state = tmp_path / "checkpoints" / "step-000002" / "training_state.json"
    state.write_text('{"progress": ')
    with pytest.raises(ResumeError, match=f"{state}: malformed JSON"):
        run(tmp_path, 4)
    model = state.parent / "model.safetensors"
    model.write_bytes(model.read_bytes()[:40])  # truncated
    with pytest.raises(ResumeError, match=r"step-000002: cannot be loaded \(SafetensorError"):
        run(tmp_path, 4)


def test_a_fresh_start_clears_the_records_of_a_run_that_left_no_checkpoint(tmp_path, caplog):
    run(tmp_path, 3, save_every=0)  # died before its first checkpoint, say
    shutil.rmtree(tmp_path / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="realm.training.core"):
        run(tmp_path, 2, save_every=0)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert any("held 3 records of an earlier run" in r.getMessage() for r in caplog.records)
