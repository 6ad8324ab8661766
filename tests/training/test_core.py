"""The shared training core: per-part learning rates and holds."""

import torch

from realm.tracking import Tracker, read_metrics
from realm.training.core import TrainSettings, _lr_lambda, _param_groups, train
from realm.training.accelerator import shutdown


class TwoParts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.retriever = torch.nn.Linear(4, 4)
        self.reader = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.reader(torch.tanh(self.retriever(x)))


class Regression:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def train_dataset(self):
        return list(range(64))

    def collate(self, rows):
        return torch.tensor(rows)

    def loss(self, model, batch):
        loss = torch.nn.functional.mse_loss(model(self.x[batch]), self.y[batch])
        return loss, {}

    def evaluate(self, model):
        return {}


class Snapshots:
    def __init__(self):
        self.retriever, self.reader = [], []

    def after_step(self, step, model):
        self.retriever.append(model.retriever.weight.detach().clone())
        self.reader.append(model.reader.weight.detach().clone())


def test_held_part_waits_then_trains(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TwoParts()
    start = model.retriever.weight.detach().clone()
    snaps = Snapshots()
    settings = TrainSettings(run_dir=str(tmp_path), steps=8, batch_size=8, lr=1e-2,
                             warmup_steps=1, log_every=4, progress=False,
                             lr_scales={"retriever.": 0.5}, lr_holds={"retriever.": 5})
    tracker = Tracker(str(tmp_path))
    try:
        train(model, Regression(), settings, accelerator, tracker, hooks=[snaps])
    finally:
        tracker.close()
        shutdown(accelerator)
    assert all(torch.equal(w, start) for w in snaps.retriever[:5])  # steps 1-5: held
    assert not torch.equal(snaps.retriever[5], start)  # step 6 moves it
    assert not torch.equal(snaps.reader[0], snaps.reader[1])  # the reader trains from the start
    logged = [r["lr"] for r in read_metrics(str(tmp_path)) if "lr" in r]
    assert logged[0] > 0  # the logged rate is the largest group's, not the held one's


def test_lr_lambda_with_a_hold_restarts_warmup_and_decay():
    f = _lr_lambda(warmup=2, total=8, hold=4)
    assert [round(f(s), 3) for s in range(8)] == [0, 0, 0, 0, 0.5, 1.0, 1.0, 0.5]
    g = _lr_lambda(warmup=2, total=4)  # the same schedule, unheld
    assert [f(s + 4) for s in range(4)] == [g(s) for s in range(4)]


def test_a_part_can_have_its_own_adam_betas():
    torch.manual_seed(0)
    model = TwoParts()
    groups = _param_groups(model, 0.01, 1e-3, {"retriever.": 0.1}, None,
                           {"retriever.": (0.99, 0.999)})
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        if name.startswith("retriever."):
            assert g["betas"] == (0.99, 0.999) and g["lr"] == 1e-4
        else:
            assert "betas" not in g and g["lr"] == 1e-3
    # the optimizer keeps them and steps with them
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert {g.get("betas") for g in opt.param_groups} == {(0.99, 0.999), (0.9, 0.999)}
    x = torch.randn(16, 4)
    start = model.retriever.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(model.retriever.weight, start)


def test_cpu_threads_share_the_cores_among_the_local_processes(monkeypatch):
    import os

    from realm.precision import cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores
    assert cpu_threads() == 1
    assert cpu_threads(3) == 3  # train.threads given


class Threads:
    def __init__(self):
        self.seen = []

    def after_step(self, step, model):
        self.seen.append(torch.get_num_threads())


def test_the_core_trains_on_train_threads(tmp_path):
    from accelerate import Accelerator

    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    accelerator = Accelerator(cpu=True)
    threads = Threads()
    settings = TrainSettings(run_dir=str(tmp_path), steps=3, batch_size=8, lr=1e-2,
                             log_every=1, progress=False, threads=want)
    tracker = Tracker(str(tmp_path))
    try:
        train(TwoParts(), Regression(), settings, accelerator, tracker, hooks=[threads])
    finally:
        tracker.close()
        shutdown(accelerator)
        torch.set_num_threads(before)
    assert threads.seen == [want] * 3


class Diverging(Regression):
    """A loss that turns NaN at the third step."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan") if self.calls == 3 else loss), metrics


def test_a_non_finite_loss_stops_the_run_before_stepping_or_saving(tmp_path):
    import os

    import pytest
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    settings = TrainSettings(run_dir=str(tmp_path), steps=6, batch_size=8, lr=1e-2,
                             log_every=1, progress=False, save_every=1)
    tracker = Tracker(str(tmp_path))
    model = TwoParts()
    snapshots = Snapshots()
    try:
        with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3 of 6"):
            train(model, Diverging(), settings, accelerator, tracker, hooks=[snapshots])
    finally:
        tracker.close()
        shutdown(accelerator)
    assert len(snapshots.reader) == 2  # two steps taken, the third never
    assert torch.equal(model.reader.weight, snapshots.reader[-1])
    assert torch.isfinite(model.reader.weight).all()
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    assert saved[-1] == "step-000002" and not [s for s in saved if "tmp" in s]


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_never_loaded(tmp_path):
    """The training state beside accelerate's own is JSON; a pickle planted in a checkpoint (as
    accelerate's custom-object protocol would unpickle it) is never executed on resume."""
    import json
    import os

    from accelerate import Accelerator

    def run(steps):
        accelerator = Accelerator(cpu=True)
        settings = TrainSettings(run_dir=str(tmp_path), steps=steps, batch_size=8, lr=1e-2,
                                 log_every=1, progress=False, save_every=2)
        tracker = Tracker(str(tmp_path))
        try:
            return train(TwoParts(), Regression(), settings, accelerator, tracker)
        finally:
            tracker.close()
            shutdown(accelerator)

    run(2)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    assert not list(ckpt.glob("custom_checkpoint_*.pkl"))
    state = json.loads((ckpt / "training_state.json").read_text())
    assert state["progress"]["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    import pytest

    for i in range(3):
        (ckpt / f"custom_checkpoint_{i}.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl.*not loaded"):
        run(4)
    assert not marker.exists()
    for i in range(3):
        (ckpt / f"custom_checkpoint_{i}.pkl").unlink()
    result = run(4)  # the JSON state resumes the run
    assert result["resumed_from"].endswith("step-000002") and result["steps"] == 4
    assert not marker.exists()


FULL_DISK = """
import resource, signal, sys
from accelerate import Accelerator
sys.path.insert(0, sys.argv[2])
from test_core import Regression, TwoParts
from realm.tracking import Tracker
from realm.errors import CheckpointError
from realm.training.core import TrainSettings, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a checkpoint's RNG states do not fit
settings = TrainSettings(run_dir=sys.argv[1], steps=4, batch_size=8, log_every=1, progress=False,
                         save_every=2)
try:
    train(TwoParts(), Regression(), settings, Accelerator(cpu=True), Tracker(sys.argv[1]))
except CheckpointError as e:
    print(e)
    sys.exit(7)
"""


def test_a_checkpoint_that_cannot_be_written_names_the_path_and_leaves_no_temp(tmp_path):
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), here],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 7, done.stderr[-3000:]
    message = done.stdout.strip()
    where = tmp_path / "checkpoints"
    assert message.startswith(f"saving checkpoint step 2 into {where}/.tmp-step-000002 failed: "
                              f"File too large writing under {where}"), message
    assert "the temp directory was removed" in message
    assert os.listdir(tmp_path / "checkpoints") == []  # no .tmp-step-N left behind
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # steps 1 and 2


def test_heartbeat_and_lease_writes_that_fail_never_stop_training(tmp_path, caplog):
    import errno
    import logging
    import types

    from realm.refresh.rundir import RunStore
    from realm.refresh.hook import RefreshHook

    hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=100, is_main=True)
    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "HEARTBEAT"))

    hook.store.write_heartbeat = full
    hook.store.acquire_lease = full
    hook.watcher.current = types.SimpleNamespace(generation=0, encoder_step=0)
    with caplog.at_level(logging.WARNING, logger="realm.fsutil"):
        hook.after_step(1, None)
        assert hook.state_dict() == {"generation": 0, "step": 1}
    assert len(calls) == 6  # three tries each
    warnings = [r.getMessage() for r in caplog.records]
    assert any("heartbeat failed 3 times" in w and "No space left" in w for w in warnings)
    assert any("pinning the checkpoint's generation failed" in w for w in warnings)


def test_precision_from_accelerate_launch_and_the_config(monkeypatch):
    """``train.precision=auto`` takes what ``accelerate launch --mixed_precision bf16|fp16`` set
    (``no``: auto's own choice); an explicit config value wins; fp16 needs CUDA."""
    import pytest

    from realm.errors import ConfigError
    from realm.precision import autocast_dtype, training_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training_precision("auto", cpu) == "bf16"
    assert training_precision("fp32", cpu) is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert training_precision("auto", cpu) == autocast_dtype("auto", cpu)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert training_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA device"):
        training_precision("fp16", cpu)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA device"):
        training_precision("auto", cpu)
    assert training_precision("fp16", torch.device("cuda")) == "fp16"  # (no device touched)


def test_reading_one_batch_ahead_only_when_asked():
    from realm.training.core import _with_next

    assert list(_with_next([1, 2, 3], enabled=True)) == [(1, 2), (2, 3), (3, None)]
    assert list(_with_next([1, 2, 3], enabled=False)) == [(1, None), (2, None), (3, None)]
    assert list(_with_next([], enabled=True)) == []
    pulled = []

    def source():
        for i in range(3):
            pulled.append(i)
            yield i

    for batch, _ in _with_next(source(), enabled=False):
        assert pulled[-1] == batch  # nothing read ahead of its step


class InterruptAt:
    """Ctrl-C at a chosen point of step ``at``: inside the optimizer's update (a real SIGINT to
    this process) or in a hook after the update (the KeyboardInterrupt itself)."""

    def __init__(self, at, where):
        self.at, self.where, self.step = at, where, 0

    def before_step(self, step):
        self.step = step + 1

    def after_step(self, step, model):
        if step == self.at and self.where == "hook":
            raise KeyboardInterrupt


def test_an_interrupt_during_a_step_checkpoints_that_step_whole(tmp_path, monkeypatch):
    """A SIGINT that arrives inside the optimizer's update acts once the step count has caught up
    (the checkpoint's weights are its step's); one that arrives after the update but before the
    step's record still leaves that record, so the resumed run's metrics have every step once."""
    import signal

    from realm.training.checkpoint import checkpoints

    # Python's own Ctrl-C handler: a shell starts background jobs with SIGINT ignored, and
    # Python then keeps it ignored (CI run under nohup ... &), where no interrupt would arrive
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_each_way(tmp_path, monkeypatch, checkpoints)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_each_way(tmp_path, monkeypatch, checkpoints):
    import os
    import signal

    import pytest
    from accelerate import Accelerator

    for where in ("update", "hook"):
        run_dir = tmp_path / where
        interrupt = InterruptAt(3, where)
        real_step = torch.optim.AdamW.step

        def step(self, *a, **kw):
            out = real_step(self, *a, **kw)
            if where == "update" and interrupt.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # delivered at once, unless held
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = TwoParts()
        settings = TrainSettings(run_dir=str(run_dir), steps=8, batch_size=8, lr=1e-2,
                                 warmup_steps=1, log_every=1, save_every=0, progress=False)
        tracker = Tracker(str(run_dir))
        try:
            with pytest.raises(KeyboardInterrupt):
                train(model, Regression(), settings, accelerator, tracker, hooks=[interrupt])
        finally:
            tracker.close()
            shutdown(accelerator)
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
        ((step_no, path),) = checkpoints(str(run_dir))
        assert step_no == 3, where
        assert [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r] == [1, 2, 3], where
