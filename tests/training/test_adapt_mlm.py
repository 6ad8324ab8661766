"""The MLM adaptation stage end to end (launch/adapt_mlm.py) and as pretraining's cached stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

#: end-to-end runs of the stage: the full suite (`pytest`) runs them, the fast tier does not
pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    return env


def _adapt_cmd(run_dir, corpus, encoder, tmp_path, *extra):
    return [sys.executable, str(REPO / "launch" / "adapt_mlm.py"), "--no-progress",
            f"corpus={corpus}", f"mlm.encoder={encoder}", "mlm.encoder_layers=null",
            "mlm.holdout_blocks=40", "mlm.max_tokens=64", f"cache_dir={tmp_path / 'c'}",
            f"train.run_dir={run_dir}", "train.batch_size=16", "train.lr=5e-3",
            "train.warmup_steps=2", "train.precision=fp32", "train.eval_every=0",
            "train.save_every=10", "logging.log_every=5", *extra]


@pytest.fixture(scope="module")
def adapted(leads_corpus, tiny_encoder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    done = subprocess.run(_adapt_cmd(tmp / "run", leads_corpus, tiny_encoder, tmp,
                                     "train.steps=40"),
                          capture_output=True, text=True, timeout=300, env=_env(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), tmp


def test_mlm_loss_falls_on_real_text(adapted):
    summary, _ = adapted
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert summary["steps"] == 40 and summary["layers"] is None
    # a fresh head over 30,522 words starts near log(30522) = 10.3 nats; 40 steps learn the
    # frequent words of the held-out blocks (never trained on)
    assert before["heldout_loss"] > 9.5
    assert after["heldout_loss"] < before["heldout_loss"] - 2.0
    assert after["heldout_masked_accuracy"] > before["heldout_masked_accuracy"] + 0.03
    assert [f["text"] for f in summary["fill_in"]][0] == "The capital of France is [MASK]."
    assert all(len(f["top"]) == 3 for f in summary["fill_in"])


def test_output_loads_with_plain_transformers_and_stays_tied(adapted):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder

    summary, _ = adapted
    out = Path(summary["encoder"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "knowledge_augmented_encoder" and manifest["tied_embeddings"]
    assert manifest["metadata"]["heldout_after"]["heldout_loss"] == pytest.approx(
        summary["heldout_after"]["heldout_loss"], abs=1e-3)
    mlm = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 30522 and tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    ours = KnowledgeAugmentedEncoder.from_pretrained(out).eval()
    enc = tok("The capital of France is [MASK].", return_tensors="pt")
    with torch.no_grad():
        a = mlm(**enc).logits
        b = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits
    torch.testing.assert_close(a, b)


def test_rerun_resumes_and_trains_nothing(adapted, leads_corpus, tiny_encoder):
    summary, tmp = adapted
    done = subprocess.run(_adapt_cmd(tmp / "run", leads_corpus, tiny_encoder, tmp,
                                     "train.steps=40"),
                          capture_output=True, text=True, timeout=300, env=_env(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again["resumed_from"].endswith("step-000040") and again["steps"] == 40
    assert again["heldout_after"] == summary["heldout_after"]


def test_vocabulary_other_than_the_corpus_is_refused_with_both_names(leads_corpus, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    other = tmp_path / "other-encoder"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(other)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32),
              add_pooling_layer=False).save_pretrained(other)
    done = subprocess.run(_adapt_cmd(tmp_path / "run", leads_corpus, other, tmp_path,
                                     "train.steps=2"),
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert done.returncode == 1
    assert leads_corpus in done.stderr and "other-encoder" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "encoder").exists()


def test_a_corpus_with_no_text_to_mask_is_an_error_naming_it():
    from realm.data.mlm_adapt import mlm_text_blocks

    class Empty:
        path = "/data/empty-corpus"
        blocks = np.zeros(3, dtype=[("n_tokens", "<i4")])

        def __len__(self):
            return 3

    with pytest.raises(ValueError, match="/data/empty-corpus.*no block with text"):
        mlm_text_blocks(Empty())


def _config(tmp_path, corpus, encoder, *overrides):
    from realm.config import load_config

    return load_config(overrides=[f"cache_dir={tmp_path / 'cache'}",
                                  "pretrain.mlm_steps=6", "pretrain.mlm_batch_size=8",
                                  "mlm.holdout_blocks=8", "mlm.max_tokens=48",
                                  "train.precision=fp32", *overrides])


def test_pretraining_caches_the_adaptation_and_rebuilds_it_when_its_key_changes(
        leads_corpus, tiny_encoder, tmp_path):
    from realm.training.prepare import prepare_adapted_encoder

    config = _config(tmp_path, leads_corpus, tiny_encoder)
    first = prepare_adapted_encoder(config, leads_corpus, tiny_encoder)
    assert Path(first, "manifest.json").exists() and first != tiny_encoder
    stamp = Path(first, "manifest.json").stat().st_mtime_ns
    t0 = time.monotonic()
    assert prepare_adapted_encoder(config, leads_corpus, tiny_encoder) == first  # reused
    assert time.monotonic() - t0 < 5 and Path(first, "manifest.json").stat().st_mtime_ns == stamp
    # what changes the result changes the key: another cached copy
    other = prepare_adapted_encoder(_config(tmp_path, leads_corpus, tiny_encoder,
                                            "mlm.mask_prob=0.3"), leads_corpus, tiny_encoder)
    assert other != first and Path(other, "manifest.json").exists()
    # an encoder that has a trained head is used as it is, and mlm_steps=0 adapts nothing
    assert prepare_adapted_encoder(config, leads_corpus, first) == first
    off = _config(tmp_path, leads_corpus, tiny_encoder, "pretrain.mlm_steps=0")
    assert prepare_adapted_encoder(off, leads_corpus, tiny_encoder) == tiny_encoder


def test_a_copy_head_is_adapted_in_the_readers_layout_cached_under_its_own_key(
        leads_corpus, tiny_encoder, tmp_path):
    from transformers import AutoModelForMaskedLM

    from realm.modeling.readers.copy import CopyHead
    from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
    from realm.training.prepare import prepare_adapted_encoder

    config = _config(tmp_path, leads_corpus, tiny_encoder, "mlm.copy_head=true",
                     "mlm.neighbour_prob=0.7", "mlm.random_prob=0.15", "pretrain.mlm_steps=8")
    out = prepare_adapted_encoder(config, leads_corpus, tiny_encoder)
    assert "copy_head.safetensors" in json.loads(Path(out, "manifest.json").read_text())["files"]
    encoder = KnowledgeAugmentedEncoder.from_pretrained(out)
    fresh = CopyHead(encoder.config.hidden_size)
    assert encoder.copy_head is not None  # and trained: its gate moved off the initial bias
    assert float(encoder.copy_head.gate.bias) != float(fresh.gate.bias)
    AutoModelForMaskedLM.from_pretrained(out)  # still a plain masked LM beside the head file
    plain = prepare_adapted_encoder(_config(tmp_path, leads_corpus, tiny_encoder,
                                            "mlm.neighbour_prob=0.7", "mlm.random_prob=0.15",
                                            "pretrain.mlm_steps=8"), leads_corpus, tiny_encoder)
    assert plain != out and KnowledgeAugmentedEncoder.from_pretrained(plain).copy_head is None


def test_a_killed_adaptation_leaves_nothing_that_looks_complete(leads_corpus, tiny_encoder,
                                                               tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_adapt_cmd(run_dir, leads_corpus, tiny_encoder, tmp_path,
                                       "train.steps=400", "train.save_every=5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(tmp_path))
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(run_dir.glob("checkpoints/step-*")), "no checkpoint before the kill"
    assert not (run_dir / "encoder").exists()  # the output appears only complete
    for ckpt in run_dir.glob("checkpoints/step-*"):
        assert (ckpt / "manifest.json").exists()  # every checkpoint that looks complete is
