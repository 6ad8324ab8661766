"""The refresh hook inside the shared training core: publish, swap, checkpoint the generation."""

import os
import time
import types

import pytest
import torch

from realm.data.ict import ict_blocks
from realm.data.store import BlockStore
from realm.modeling.embed import special_ids
from realm.refresh.rundir import RunStore
from realm.modeling.retriever import Retriever
from realm.refresh.hook import RefreshHook
from realm.refresh.supervisor import RefresherSupervisor
from realm.tracking import Tracker, read_metrics
from realm.training.core import TrainSettings, train
from realm.training.ict import ICTTask
from realm.training.accelerator import shutdown

from .conftest import child_env, refresher_cmd


def _train(run_dir, corpus, retriever_dir, steps, save_every, monkeypatch, **hook_kwargs):
    from accelerate import Accelerator

    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    accelerator = Accelerator(cpu=True)
    store = BlockStore(corpus)
    torch.manual_seed(0)
    retriever = Retriever.from_pretrained(retriever_dir)
    blocks = ict_blocks(store, min_query_tokens=5)
    task = ICTTask(store, blocks, blocks[:0], special_ids(retriever.tokenizer), accelerator,
                   0.9, 32, 64, 5, 0)
    run_store = RunStore(run_dir)
    supervisor = RefresherSupervisor(run_dir, refresher_cmd(run_dir, corpus)[4:], max_restarts=1)
    hook = RefreshHook(run_store, retriever, lambda m: accelerator.unwrap_model(m),
                       corpus_fingerprint=store.fingerprint, dim=retriever.dim, every_steps=3,
                       is_main=True, supervisor=supervisor, poll_s=0.1, first_timeout_s=120,
                       **hook_kwargs)
    settings = TrainSettings(run_dir=run_dir, steps=steps, batch_size=4, lr=1e-3, log_every=1,
                             save_every=save_every, progress=False)
    tracker = Tracker(run_dir)
    try:
        result = train(retriever, task, settings, accelerator, tracker,
                       hooks=[hook, TrainingPace()])
    finally:
        hook.close(finished=True)
        tracker.close()
        shutdown(accelerator)
    return result, hook


class TrainingPace:
    """Steps of a tiny model take milliseconds; a real step gives the refresher time to work."""

    def after_step(self, step, model):
        time.sleep(0.4)


@pytest.mark.slow
def test_hook_publishes_swaps_and_checkpoints_the_generation(leads_corpus, tiny_retriever,
                                                            tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    result, hook = _train(run_dir, leads_corpus, tiny_retriever, 12, 6, monkeypatch)
    assert result["steps"] == 12
    store = RunStore(run_dir)
    assert store.is_done() and not hook.supervisor.alive
    assert len(hook.generations_used) >= 2, hook.generations_used
    records = [r for r in read_metrics(run_dir) if "index/generation" in r]
    assert len(records) == 12
    gens = [r["index/generation"] for r in records]
    assert gens == sorted(gens) and gens[-1] >= 1
    assert all(r["index/staleness_steps"] >= 0 for r in records)
    assert max(r["index/staleness_steps"] for r in records) == hook.max_staleness_steps
    # snapshots every 3 steps, the newest kept; the checkpoint pinned its generation
    assert store.latest_encoder()["step"] == 12
    leases = store.leases()
    assert {"checkpoint-step-000006", "checkpoint-step-000012"} <= set(leases)
    assert all(leases[h]["pinned"] for h in leases if h.startswith("checkpoint-"))
    assert leases["checkpoint-step-000012"]["generation"] in store.generations()


@pytest.mark.slow
def test_resume_starts_on_the_pinned_generation_then_swaps_and_sets_the_future_aside(
        leads_corpus, tiny_retriever, tmp_path, monkeypatch):
    """At resume a newer generation than the pinned one is in index/LATEST (so starting on the
    pinned one is a choice, not the only option), and one built from an encoder of a step after
    the checkpoint (what a run killed after it left): the first resumed step runs on the pinned
    generation, a later one swaps to the newer, and the future one is set aside, never used."""
    import numpy as np

    run_dir = str(tmp_path / "run")
    _train(run_dir, leads_corpus, tiny_retriever, 6, 6, monkeypatch)
    store, corpus = RunStore(run_dir), BlockStore(leads_corpus)
    pinned = store.leases()["checkpoint-step-000006"]["generation"]
    rows = np.random.default_rng(0).standard_normal((len(corpus), 16)).astype(np.float32)
    newer = store.commit_generation(rows, encoder_step=6, corpus_fingerprint=corpus.fingerprint)
    store.publish_encoder(Retriever.from_pretrained(tiny_retriever), 9)
    future = store.commit_generation(rows, encoder_step=9, corpus_fingerprint=corpus.fingerprint)
    assert pinned < newer < future == store.read_latest()["generation"]
    os.remove(os.path.join(run_dir, "DONE"))  # continue the run for more steps
    result, hook = _train(run_dir, leads_corpus, tiny_retriever, 9, 6, monkeypatch)
    assert result["resumed_from"].endswith("step-000006") and hook.started_at == 6
    used = {r["step"]: r["index/generation"] for r in read_metrics(run_dir)
            if "index/generation" in r and r["step"] > 6}
    assert used[7] == pinned  # the pinned one, though a newer one was there
    assert newer in set(used.values()) - {used[7]}  # a resumed step really swapped
    assert future not in used.values() and future not in hook.generations_used
    aside = list((tmp_path / "run" / "discarded").glob("after-step-000006-*"))
    assert len(aside) == 1 and (aside[0] / "snapshots" / "step-000009").is_dir()
    assert (aside[0] / "index" / f"gen-{future:06d}").is_dir()


@pytest.mark.slow
def test_a_fixed_lag_swaps_each_generation_in_at_its_step(leads_corpus, tiny_retriever,
                                                          tmp_path, monkeypatch):
    """refresh.lag_steps: the generation of the snapshot of step s is read from step s + lag + 1
    on, never sooner (the refresher builds one in well under the 2 steps of 0.4 s it has), so
    which index every step reads does not depend on the refresher's speed."""
    run_dir = str(tmp_path / "run")
    result, hook = _train(run_dir, leads_corpus, tiny_retriever, 12, 0, monkeypatch, lag_steps=2)
    assert result["steps"] == 12
    read = {r["step"]: r["index/encoder_step"] for r in read_metrics(run_dir)
            if "index/encoder_step" in r}
    # snapshots at 3, 6, 9 (12's would be due at 14); each in use after step s + 2
    assert read == {t: 0 if t < 5 else 3 * ((t - 2) // 3) for t in range(1, 13)}
    assert hook.max_staleness_steps == 4 and len(hook.generations_used) == 4


def test_no_snapshot_while_the_encoders_are_held(tmp_path):
    hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=3, is_main=True, publish_after=6)
    published = []
    hook.publish = lambda model, step: published.append(step)
    for step in range(1, 13):
        hook.after_step(step, None)
    assert published == [9, 12]  # steps 3 and 6: the document encoder had not moved


class Child(RefresherSupervisor):
    """A supervised child that spins on one core (a refresher embedding) or sleeps (idling)."""

    def __init__(self, run_dir, busy):
        super().__init__(run_dir, log_path=os.path.join(run_dir, f"child-{busy}.log"))
        self.code = "while True: pass" if busy else "import time; time.sleep(600)"

    @property
    def command(self):
        import sys

        return [sys.executable, "-c", self.code]


def _cores_used(child):
    child.cpu_fraction()
    time.sleep(1.0)
    return child.cpu_fraction()


def test_the_trainer_gives_cores_to_a_busy_refresher(tmp_path):
    before = torch.get_num_threads()
    busy, idle = Child(str(tmp_path), True), Child(str(tmp_path), False)
    busy.start(), idle.start()
    try:
        time.sleep(0.5)  # both children are up (python started)
        busy_cores, idle_cores = _cores_used(busy), _cores_used(idle)
        assert busy_cores > 0.5 and idle_cores < 0.2, (busy_cores, idle_cores)
        hook = RefreshHook(RunStore(str(tmp_path / "run")), None, lambda m: m,
                           corpus_fingerprint="f", dim=8, every_steps=3, is_main=True,
                           supervisor=busy, threads=(2, 1))
        assert hook.share_cores(busy_cores) == 1 and torch.get_num_threads() == 1
        assert hook.share_cores(idle_cores) == 2 and torch.get_num_threads() == 2
        metrics = hook.metrics(4)
        assert metrics["train/threads"] == 2 and metrics["train/shared_steps"] == 1
        # a snapshot just published: the refresher is about to embed it, however idle it was
        hook.supervisor, hook.last_published = idle, 5
        assert hook.share_cores(idle_cores) == 1
        hook.watcher.current = types.SimpleNamespace(generation=1, encoder_step=5)  # done
        assert hook.share_cores(idle_cores) == 2
        hook.last_published = 10
        idle.stop(timeout=0)  # a refresher that is not running will not embed it
        assert hook.share_cores(0.0) == 2
        hook.supervisor, hook.last_published = busy, 20
        assert hook.share_cores(busy_cores) == 1
        hook.supervisor = None  # (close() would stop it)
        hook.close()
        assert torch.get_num_threads() == 2  # a closed hook leaves the trainer on all threads
    finally:
        busy.stop(timeout=0), idle.stop(timeout=0)
        torch.set_num_threads(before)
    assert busy.cpu_fraction() == 0.0  # not running
    # as many threads while embedding as otherwise (one core, or share_cores off): nothing to do
    hook = RefreshHook(RunStore(str(tmp_path / "run2")), None, lambda m: m, corpus_fingerprint="f",
                       dim=8, every_steps=3, is_main=True, threads=(1, 1))
    assert hook.threads is None and "train/threads" not in hook.metrics(1)
