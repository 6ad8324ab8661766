"""Helpers for tests that run real refresher processes against a run directory."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def refresher_cmd(run_dir, corpus, *extra):
    return [sys.executable, str(REPO / "launch" / "refresh_index.py"), "--run-dir", str(run_dir),
            "--corpus", str(corpus), "--no-progress", "refresh.poll_s=0.2", "refresh.threads=1",
            "refresh.heartbeat_timeout_s=0", *extra]


def child_env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def start(cmd, log_path, **env):
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(**env))
    log.close()
    return proc


def run(cmd, timeout=120, **env):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env))
    return done


def summary(done):
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for(predicate, timeout=60.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_log(path, text, proc=None, timeout=90.0):
    def seen():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {text!r}:\n"
                                 + Path(path).read_text(errors="replace")[-3000:])
        return os.path.exists(path) and text in Path(path).read_text(errors="replace")
    wait_for(seen, timeout, what=repr(text))


def publish(store, retriever_dir, step, seed):
    """Publish a changed copy of the tiny retriever as the encoder snapshot at ``step``."""
    from realm.modeling.retriever import Retriever

    retriever = Retriever.from_pretrained(retriever_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in retriever.doc_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    store.publish_encoder(retriever, step)


@pytest.fixture
def corpus_fp(leads_corpus):
    from realm.data.store import BlockStore

    return BlockStore(leads_corpus).fingerprint
