"""launch/pretrain.py end to end: a tiny model on real lead sections, the real refresher process.

One run (module fixture) is shared by the tests: 40 steps, a new encoder snapshot every 5 steps,
checkpoints every 5 steps, metrics every step, wandb offline.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _env(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        env[key] = str(tmp_path / "wandb" / key.lower())
    return env


def _pretrain(run_dir, corpus, retriever, encoder, tmp_path, *extra, timeout=300,
              launcher=(sys.executable,)):
    cmd = _pretrain_cmd(run_dir, corpus, retriever, encoder, tmp_path, *extra, launcher=launcher)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "terminate called" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pretrain_cmd(run_dir, corpus, retriever, encoder, tmp_path, *extra, launcher):
    return [*launcher, str(REPO / "launch" / "pretrain.py"), "--no-progress",
           f"corpus={corpus}", f"pretrain.retriever={retriever}",
           f"pretrain.encoder={encoder}", "pretrain.encoder_layers=null", "pretrain.k=3",
           "pretrain.mlm_steps=0",  # (the MLM adaptation has its own tests)
           "pretrain.reader_type=masked_lm",  # the tiny encoder reads (the default: SmolLM2)
           "pretrain.max_joined_tokens=96", "pretrain.table_every=10",
           f"cache_dir={tmp_path / 'cache'}", "retriever.max_query_tokens=24",
           "retriever.max_block_tokens=64", f"train.run_dir={run_dir}", f"train.steps={STEPS}",
           "train.batch_size=4", "train.save_every=5", "train.keep_checkpoints=10",
           "train.warmup_steps=2", "train.precision=fp32", "refresh.every_steps=5",
           "refresh.lag_steps=0", "refresh.share_cores=true", "refresh.poll_s=0.1", "refresh.threads=1", "logging.log_every=1",
           "logging.wandb=true", "logging.wandb_mode=offline", "logging.report_every=20", *extra]


def _records(run_dir):
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(spans_corpus, tiny_retriever, tiny_encoder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    run_dir = tmp / "run"
    summary = _pretrain(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp)
    return summary, run_dir, tmp


def test_run_swaps_generations_and_writes_its_run_directory(run):
    summary, run_dir, tmp = run
    assert summary["steps"] == STEPS and summary["world_size"] == 1
    assert summary["generations_swapped"] >= 2, summary
    assert 0 < summary["max_staleness_steps"] <= STEPS
    # held-out span recall of the warm start and of the final retriever (pretrain.k = 3)
    assert summary["span_recall_examples"] > 0
    assert 0 <= summary["span_recall_start"] <= 1 and 0 <= summary["span_recall_end"] <= 1
    # paired on the same sentences: what the end hits that the start missed, and the reverse
    n = summary["span_recall_examples"]
    gained, lost = summary["span_recall_gained"], summary["span_recall_lost"]
    assert round(summary["span_recall_end"] - summary["span_recall_start"], 4) == round(
        (gained - lost) / n, 4)
    assert 0 < summary["span_recall_p"] <= 1
    for name in ("config.yaml", "metrics.jsonl", "index/LATEST", "snapshots/LATEST", "DONE",
                 f"checkpoints/step-{STEPS:06d}/manifest.json", "retriever/manifest.json",
                 "reader/manifest.json", "refresher.log"):
        assert (run_dir / name).exists(), name
    # wandb honours WANDB_DIR: the trainer's and the refresher's runs, in one group of this run
    # alone (the run directory's name and a suffix), each with the id kept in its directory;
    # one printed command uploads both
    wandb_runs = list((tmp / "wandb" / "wandb_dir" / "wandb").glob("offline-run-*"))
    trainer, refresher = (json.loads((d / "wandb_run.json").read_text())
                          for d in (run_dir, run_dir / "refresher"))
    assert trainer["group"] == refresher["group"] == (run_dir / "wandb_group").read_text().strip()
    assert trainer["group"].startswith(run_dir.name + "-") and len(trainer["group"]) > len(
        run_dir.name) + 4
    assert trainer["id"] != refresher["id"]
    assert {r.name.rsplit("-", 1)[-1] for r in wandb_runs} == {trainer["id"], refresher["id"]}
    sync = summary["wandb_sync"].split()
    assert sync[:2] == ["wandb", "sync"] and sorted(sync[2:]) == sorted(map(str, wandb_runs))
    scalars = [r for r in _records(run_dir) if "table" not in r]
    assert [r["step"] for r in scalars] == list(range(1, STEPS + 1))
    for key in ("loss", "masked_accuracy", "loss_null", "ru_expected", "ru_top1", "p_null",
                "retrieval_entropy", "index/generation", "index/staleness_steps",
                "examples_per_s"):
        assert all(key in r for r in scalars), key
    assert any(k.startswith("ru_by_label/") for r in scalars for k in r)
    generations = sorted({r["index/generation"] for r in scalars})
    assert len(generations) == summary["generations_swapped"]
    # the index in use was made by an encoder snapshot at most a few publishes old
    assert all(r["index/staleness_steps"] <= r["step"] for r in scalars)
    cores = len(os.sched_getaffinity(0))
    if cores > 1:  # the trainer gives a core to its refresher (refresh.threads=1) while it embeds
        assert {r["train/threads"] for r in scalars} <= {cores - 1, cores}
        assert 0 <= scalars[-1]["train/shared_steps"] <= STEPS


def test_report_page_draws_the_runs_metrics(run, tmp_path):
    """logging.report_every wrote RUN_DIR/report during and after the run; launch/report.py
    draws the same page anywhere. Its first block, the headline box, holds the numbers of the
    run's summary line."""
    summary, run_dir, _ = run
    page = (run_dir / "report" / "index.html").read_text()
    cells = {k: float(v) for k, v in re.findall(r"data-key='([^']+)' data-value='([^']+)'", page)}
    for key in ("ru_first_quarter", "ru_last_quarter", "masked_accuracy_first_quarter",
                "masked_accuracy_last_quarter", "masked_accuracy_null_first_quarter",
                "masked_accuracy_null_last_quarter", "generations_swapped"):
        assert cells[key] == summary[key], key
    assert page.index("class='headline'") < page.index("<img")
    for stem in ("loss", "ru", "ru_by_label", "p_null", "entropy", "masked_accuracy",
                 "staleness", "refresher_timeline", "refresher_throughput"):
        image = run_dir / "report" / f"{stem}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert image.stat().st_size > 5000 and f"src='{stem}.png'" in page, stem
    assert f"last at step {STEPS}" in page  # the final rewrite saw the last record
    assert "<th>masked_text</th>" in page and "[MASK]" in page  # the examples table
    done = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(run_dir),
                           "--output", str(tmp_path / "page")], capture_output=True, text=True,
                          timeout=120, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["images"] >= 9 and (tmp_path / "page" / "ru.png").is_file()
    missing = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"),
                              str(tmp_path / "nothing")], capture_output=True, text=True,
                             timeout=60, env=_env(tmp_path))
    assert missing.returncode == 1 and "metrics.jsonl" in missing.stderr


def test_two_cpu_ranks_pretrain_beside_the_refresher(spans_corpus, tiny_retriever, tiny_encoder,
                                                     tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU: two gloo ranks, one
    refresher, and a clean exit with the summary printed once."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no")
    run_dir = tmp_path / "run"
    summary = _pretrain(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                        "train.steps=10", "logging.wandb=false", launcher=launcher)
    assert summary["world_size"] == 2 and summary["steps"] == 10
    assert summary["generations_swapped"] >= 1 and summary["mean_ru"] is not None
    scalars = [r for r in _records(run_dir) if "table" not in r]
    assert [r["step"] for r in scalars] == list(range(1, 11))  # the main rank logs, once a step
    # agreed swaps: at every step both ranks searched the same generation
    assert [r["index/generation_spread"] for r in scalars] == [0] * 10
    assert (run_dir / "DONE").exists() and (run_dir / "checkpoints" / "step-000010").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_localhost_with_a_sharded_index(spans_corpus, tiny_retriever,
                                                        tiny_encoder, tmp_path):
    """docs/scaling.md's multi-node recipe on one host: two "machines" of one CPU process each
    (configs/accelerate/two_machines.yaml: ``num_machines: 2``, ``main_process_ip: 127.0.0.1``;
    ``--machine_rank 0|1``) sharing the run directory, each holding half of every index
    generation (``index.sharding=ranks``)."""
    port = _free_port()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "two_machines.yaml"),
                "--main_process_port", str(port), "--dynamo_backend", "no", "--machine_rank"]
    run_dir = tmp_path / "run"
    args = ("train.steps=12", "logging.wandb=false", "logging.report_every=0",
            "index.sharding=ranks", "refresh.every_steps=4", "refresh.sync=true")
    second = subprocess.Popen(
        _pretrain_cmd(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp_path, *args,
                      launcher=[*launcher, "1"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        summary = _pretrain(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                            *args, launcher=[*launcher, "0"])
        out, err = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 0, err[-4000:]
    assert summary["world_size"] == 2 and summary["index_shards"] == 2
    assert summary["steps"] == 12 and summary["generations_swapped"] >= 2
    scalars = [r for r in _records(run_dir) if "table" not in r]
    assert [r["index/generation_spread"] for r in scalars] == [0] * 12
    # the synchronous schedule: generation g (from the encoder of step 4g) from step 4g + 1 on
    assert [r["index/generation"] for r in scalars] == [s // 4 for s in range(1, 13)]


def test_one_process_one_shard_and_a_refresher_of_two_processes(spans_corpus, tiny_retriever,
                                                                tiny_encoder, tmp_path):
    """``index.sharding=ranks`` with one process holds one shard (the whole index);
    ``refresh.devices=[cpu, cpu]`` spawns the refresher as two torchrun processes, each
    embedding half of the corpus, one commit per generation."""
    run_dir = tmp_path / "run"
    summary = _pretrain(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                        "train.steps=6", "index.sharding=ranks", "refresh.devices=[cpu, cpu]",
                        "refresh.every_steps=3", "refresh.sync=true", "logging.wandb=false",
                        "logging.report_every=0")
    assert summary["index_shards"] == 1 and summary["world_size"] == 1
    assert summary["steps"] == 6 and summary["generations_swapped"] == 3
    log = (run_dir / "refresher.log").read_text()
    refresher = [json.loads(line) for line in log.splitlines() if line.startswith('{"run_dir"')]
    assert refresher and refresher[-1]["processes"] == 2
    assert refresher[-1]["generations"] == [1, 2] or refresher[-1]["generations"][-1] == 2


def test_prefetch_and_rerank_in_a_run(spans_corpus, tiny_retriever, tiny_encoder, tmp_path):
    """``pretrain.prefetch``: every batch after a run's (and an epoch's) first is searched and
    assembled on the prefetch thread during the step before; with re-ranking beside it (its
    blocks are re-scored in the step), under bf16 autocast as the core runs the step."""
    run_dir = tmp_path / "run"
    summary = _pretrain(run_dir, spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                        "train.steps=6", "pretrain.prefetch=true", "pretrain.rerank_candidates=6",
                        "train.precision=bf16", "refresh.every_steps=3", "logging.wandb=false",
                        "logging.report_every=0")
    stats = summary["prefetch"]
    assert summary["steps"] == 6 and stats["hits"] + stats["misses"] == 6
    assert stats["hits"] >= 4 and stats["work_s_per_batch"] > 0
    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["prefetch/hit"] for r in records][:2] == [0.0, 1.0]
    assert all(0 <= r["rerank_changed"] <= 1 for r in records)


def test_examples_table_shows_retrieved_titles_and_null(run):
    _, run_dir, _ = run
    tables = [r for r in _records(run_dir) if r.get("table") == "examples"]
    assert [t["step"] for t in tables] == [10, 20, 30, 40]
    row = dict(zip(tables[-1]["columns"], tables[-1]["rows"][0]))
    assert "[MASK]" in row["masked_text"] and row["gold"]
    assert row["retrieved"].count("(") == 4 and "∅" in row["retrieved"]  # k=3 and the null
    assert 0.0 < row["p_null"] < 1.0


def test_resume_reproduces_the_next_step(run, spans_corpus, tiny_retriever, tiny_encoder):
    """From a checkpoint whose step is followed by a step on the same index generation."""
    _, run_dir, tmp = run
    scalars = {r["step"]: r for r in _records(run_dir) if "table" not in r}
    candidates = [s for s in range(5, STEPS, 5)
                  if scalars[s]["index/generation"] == scalars[s + 1]["index/generation"]]
    assert candidates, "every checkpoint was followed by a swap"
    step = candidates[-1]
    resumed = tmp / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("wandb"))
    for ckpt in (resumed / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (resumed / "metrics.jsonl").unlink()
    summary = _pretrain(resumed, spans_corpus, tiny_retriever, tiny_encoder, tmp,
                        f"train.steps={step + 1}", "refresh.spawn=false", "logging.wandb=false")
    assert summary["resumed_from"].endswith(f"step-{step:06d}")
    again = [r for r in _records(resumed) if "table" not in r]
    assert [r["step"] for r in again] == [step + 1]
    assert again[0]["index/generation"] == scalars[step + 1]["index/generation"]
    assert again[0]["loss"] == pytest.approx(scalars[step + 1]["loss"], rel=1e-5)


@pytest.mark.parametrize("schedule", ["refresh.sync=true", "refresh.lag_steps=2"])
def test_a_run_killed_after_its_checkpoint_resumes_without_drift(spans_corpus, tiny_retriever,
                                                                 tiny_encoder, tmp_path, schedule):
    """Refresh on a fixed schedule (a snapshot every 5 steps, each generation swapped in before
    the next step, or 2 steps after it). Killed at step 20 after its checkpoint at 10, the run had
    published the snapshots of steps 15 and 20 (and, synchronous, committed their generations):
    the rerun puts them aside, publishes nothing at step 10, logs each step once, rebuilds step
    15's generation, and its losses are the uninterrupted run's, step for step."""
    from realm.refresh.rundir import RunStore

    lag = 2 if "lag" in schedule else 0
    args = ("train.steps=20", "train.save_every=10", "refresh.every_steps=5", schedule,
            "logging.wandb=false", "logging.report_every=0")
    whole = tmp_path / "whole"
    _pretrain(whole, spans_corpus, tiny_retriever, tiny_encoder, tmp_path, *args)
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000020")  # killed after step 20, before saving
    (killed / "DONE").unlink()
    store = RunStore(str(killed))
    assert store.encoder_steps() == [15, 20]
    assert store.read_latest()["encoder_step"] in ((20,) if not lag else (15, 20))

    summary = _pretrain(killed, spans_corpus, tiny_retriever, tiny_encoder, tmp_path, *args)
    assert summary["resumed_from"].endswith("step-000010")
    before = {r["step"]: r for r in _records(whole) if "loss" in r}
    after = [r for r in _records(killed) if "loss" in r]
    assert [r["step"] for r in after] == list(range(1, 21))  # each step once
    # the fixed schedule: steps 1-5 read generation 0, 6-10 generation 1, ... (a record shows
    # the generation in use after its step: at step 5, the one just swapped in)
    # (with a lag of 2: the one of the snapshot of step s from step s + 2 on)
    assert [r["index/generation"] for r in before.values()] == [
        max(0, s - lag) // 5 for s in range(1, 21)]
    for r in after[10:]:
        assert r["index/generation"] == before[r["step"]]["index/generation"], r["step"]
        assert r["loss"] == pytest.approx(before[r["step"]]["loss"], rel=1e-5), r["step"]
    (aside,) = (killed / "discarded").iterdir()
    assert sorted(p.name for p in (aside / "snapshots").iterdir()) == ["step-000015", "step-000020"]
    set_aside = sorted(p.name for p in (aside / "index").iterdir())
    if not lag:  # (with a lag, whether step 20's generation was built before DONE is a race)
        assert set_aside == ["gen-000003", "gen-000004"]
        assert store.read_latest()["generation"] == 4
    assert set_aside[0] == "gen-000003"
    assert store.encoder_steps() == [15, 20]


def test_first_generation_is_cached_for_the_next_fresh_run(run):
    _, run_dir, tmp = run
    (cached,) = (tmp / "cache").glob("gen0-*.npy")
    import numpy as np

    from realm.refresh.rundir import RunStore

    gen0 = RunStore(str(run_dir)).load_generation(0, gpu=False).embeddings \
        if (run_dir / "index" / "gen-000000").exists() else None
    emb = np.load(cached)
    assert emb.dtype == np.float16 and emb.shape[1] == 16
    if gen0 is not None:  # (garbage collection may have removed it by the end of the run)
        np.testing.assert_array_equal(emb, gen0)


# SIGTERM only: its handler raises KeyboardInterrupt, so Ctrl-C (SIGINT, exit 130) runs the
# same code from there on (SIGINT's mapping: tests/test_cli.py); one run of ~35 s, not two
@pytest.mark.parametrize("signum", ["SIGTERM"])
def test_ctrl_c_stops_trainer_and_refresher_and_leaves_a_resumable_checkpoint(
        run, spans_corpus, tiny_retriever, tiny_encoder, tmp_path, signum):
    """Ctrl-C (SIGINT, exit 130) and a scheduler's SIGTERM (exit 143) take the same path: a
    checkpoint, the refresher stopped, a resumable run."""
    import signal

    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--no-progress",
           f"corpus={spans_corpus}", f"pretrain.retriever={tiny_retriever}",
           f"pretrain.encoder={tiny_encoder}", "pretrain.k=2", "pretrain.max_joined_tokens=96",
           "pretrain.mlm_steps=0", "pretrain.reader_type=masked_lm",
           f"cache_dir={run[2] / 'cache'}",  # the module run cached its generation 0
           "retriever.max_query_tokens=24", "retriever.max_block_tokens=64",
           f"train.run_dir={run_dir}", "train.steps=100000", "train.batch_size=2",
           "train.save_every=0", "train.precision=fp32", "refresh.every_steps=5",
           "refresh.lag_steps=0", "refresh.poll_s=0.1", "refresh.threads=1", "refresh.heartbeat_timeout_s=30",
           "logging.log_every=1", "logging.wandb=false"]
    log = open(tmp_path / "trainer.log", "wb")
    # its own group with Ctrl-C's default action, like a terminal's job (a suite started in the
    # background by a non-interactive shell would otherwise pass SIGINT down ignored)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=_env(tmp_path),
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _interrupt_and_resume(proc, cmd, run_dir, tmp_path, getattr(signal, signum))
    finally:  # never leave a 100000-step trainer behind when an assertion fails
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _interrupt_and_resume(proc, cmd, run_dir, tmp_path, signum):
    import signal
    import time

    from realm.fsutil import pid_alive

    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    lock_file = run_dir / "index" / ".refresher.lock"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8
               and lock_file.exists() and lock_file.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "trainer.log").read_text()[-3000:]
        time.sleep(0.2)
    lock = json.loads(lock_file.read_text())  # the refresher's pid
    # a fresh run from the same retriever and corpus starts on the cached generation 0
    gen0 = json.loads((run_dir / "index" / "gen-000000" / "manifest.json").read_text())
    assert gen0["encoder_step"] == 0 and gen0["seeded_from"].endswith(".npy")
    # a second trainer on the same run directory is refused in one line, naming the first
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert len(errors) == 1 and f"another trainer holds it (pid {proc.pid} on host" in errors[0]
    assert proc.poll() is None  # the first goes on
    os.killpg(proc.pid, signum)  # what Ctrl-C (or a scheduler) does
    out, _ = proc.communicate(timeout=120)
    want = 130 if signum == signal.SIGINT else 143
    assert proc.returncode == want, (tmp_path / "trainer.log").read_text()[-3000:]
    assert not out.strip()  # no summary: it did not finish
    assert not (run_dir / "DONE").exists()
    deadline = time.monotonic() + 30
    while pid_alive(lock["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(lock["pid"]), "the refresher outlived the trainer"
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "manifest.json").exists()
    stopped_at = int(ckpts[-1].name.split("-")[1])
    assert stopped_at >= 8
    # re-running the same command (with a reachable end) resumes there and finishes
    done = subprocess.run([c if not c.startswith("train.steps=") else f"train.steps={stopped_at + 3}"
                           for c in cmd], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"].endswith(f"step-{stopped_at:06d}")
    assert summary["steps"] == stopped_at + 3
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, stopped_at + 4))  # every step's record, once


def test_a_given_reader_starts_the_run_and_a_zero_reader_lr_holds_it_fixed(
        spans_corpus, tiny_retriever, tiny_encoder, tmp_path):
    """``pretrain.reader``: the knowledge-augmented encoder starts from that directory (the
    resolved config names it); ``pretrain.reader_lr_scale=0``: the run reads with it, fixed."""
    import torch
    import yaml

    from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder

    start = tmp_path / "reader"
    KnowledgeAugmentedEncoder.from_checkpoint(tiny_encoder).save_pretrained(start)
    summary = _pretrain(tmp_path / "run", spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                        "train.steps=4", "logging.wandb=false", f"pretrain.reader={start}",
                        "pretrain.reader_lr_scale=0")
    assert summary["steps"] == 4 and summary["mean_ru"] is not None
    with open(tmp_path / "run" / "config.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["pretrain"]["reader"] == str(start)
    given = KnowledgeAugmentedEncoder.from_pretrained(start)
    final = KnowledgeAugmentedEncoder.from_pretrained(tmp_path / "run" / "reader")
    for a, b in zip(given.parameters(), final.parameters()):  # the run did not train it
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all("loss_null" in r for r in _records(tmp_path / "run") if "ru_expected" in r)


def test_a_causal_lm_reader_reads_the_run_frozen_and_the_retriever_learns(
        spans_corpus, tiny_retriever, tiny_encoder, lm_tokenizer, make_tiny_lm, tmp_path):
    """``pretrain.reader_type=causal_lm``: a causal LM (here a random 2-layer Llama with
    SmolLM2's tokenizer) scores the spans; frozen, it leaves the run as it came, the retriever
    trains, and the run's ``encoder/`` loads with ``AutoModelForCausalLM``."""
    import torch
    from transformers import AutoModelForCausalLM

    from realm.modeling.retriever import Retriever

    lm_dir = tmp_path / "tiny-lm"
    make_tiny_lm(lm_tokenizer).save_pretrained(lm_dir)
    lm_tokenizer.save_pretrained(lm_dir)
    summary = _pretrain(tmp_path / "run", spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                        "train.steps=4", "logging.wandb=false", "pretrain.reader_type=causal_lm",
                        f"pretrain.lm={lm_dir}", "pretrain.max_joined_tokens=160",
                        "train.save_every=2")
    assert summary["steps"] == 4 and summary["mean_ru"] is not None
    given = AutoModelForCausalLM.from_pretrained(lm_dir)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "reader")
    for a, b in zip(given.parameters(), final.parameters()):  # frozen: the run did not train it
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    start, end = Retriever.from_pretrained(tiny_retriever), Retriever.from_pretrained(
        tmp_path / "run" / "retriever")
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), end.parameters()))
    records = [r for r in _records(tmp_path / "run") if "ru_expected" in r]
    assert records and all(r["loss"] == r["loss"] for r in records)  # finite, logged each step
    # its checkpoints leave the frozen LM out (rebuilt from pretrain.lm), and a resume rebuilds it
    from safetensors import safe_open

    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert saved and not [k for k in saved if k.startswith("encoder.lm.")]
    assert json.loads((ckpt / "manifest.json").read_text())["rebuilt"]["tensors"] == len(
        given.state_dict())
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    again = _pretrain(tmp_path / "run", spans_corpus, tiny_retriever, tiny_encoder, tmp_path,
                      "train.steps=4", "logging.wandb=false", "pretrain.reader_type=causal_lm",
                      f"pretrain.lm={lm_dir}", "pretrain.max_joined_tokens=160",
                      "train.save_every=2")
    assert again["resumed_from"].endswith("step-000002") and again["steps"] == 4
