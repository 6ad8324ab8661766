"""The resource planner: its figures on a built corpus, its verdicts (memory, disk, a factory the
corpus cannot train), the estimate for a corpus not built yet, the command, and a pretraining
run that refuses a configuration that cannot fit before anything runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from realm.config import load_config, override
from realm.data.store import BlockStore
from realm.errors import ConfigError
from realm.index.mips import check_factory
from realm.index.plan import check_plan, estimate_blocks, plan

REPO = Path(__file__).resolve().parents[2]
BIG = {"memory_bytes": 1 << 40, "memory_available_bytes": 1 << 40, "cpus": 4,
       "disk_free_bytes": 1 << 42, "disk_path": "/"}


def _config(tmp_path, corpus, *overrides):
    return load_config(None, [override("corpus", corpus),
                              override("train.run_dir", str(tmp_path / "run")),
                              "pretrain.encoder=sentence-transformers/all-MiniLM-L6-v2",
                              "pretrain.encoder_layers=2", "retriever.dim=128", *overrides])


def test_the_plan_of_a_built_corpus(leads_corpus, tmp_path):
    n = len(BlockStore(leads_corpus))
    out = plan(_config(tmp_path, leads_corpus), processes=1, device="cpu", machine=BIG)
    assert out["blocks"] == n and out["blocks_from"] == f"the corpus {leads_corpus}"
    assert out["index_bytes_per_rank"] == n * 128 * 4  # exact: float32 rows
    assert out["embedding_bytes_per_generation"] == n * 128 * 2  # the float16 shards
    assert out["generations_kept"] == 3 and out["generations_bytes"] == 3 * n * 128 * 2
    assert out["snapshots_kept"] == 3
    # two MiniLM layers of 384, query + document encoder, float32: ~124 MB (127 MB on disk)
    assert 110e6 < out["snapshot_bytes"] < 140e6
    assert out["refresh"]["seconds"] > 0 and "measured" in out["refresh"]
    assert out["verdict"] == "fits" and out["problems"] == []
    sharded = plan(_config(tmp_path, leads_corpus, "index.sharding=ranks"), processes=2,
                   device="cpu", machine=BIG)
    assert sharded["index_bytes_per_rank"] == -(-n // 2) * 128 * 4
    assert sharded["memory_bytes_per_machine"] == 2 * 2 * sharded["index_bytes_per_rank"] + \
        min(n, 131072) * 128 * 4  # two processes x (in use + loading) + the refresher's shard


@pytest.mark.parametrize("machine,fragment", [
    ({"memory_bytes": 1 << 16}, "does not fit this machine's memory"),
    ({"disk_free_bytes": 1 << 16}, "do not fit the disk under /"),
])
def test_memory_or_disk_too_small_is_refused(leads_corpus, tmp_path, machine, fragment):
    out = plan(_config(tmp_path, leads_corpus), processes=1, device="cpu",
               machine={**BIG, **machine})
    assert out["verdict"] == "refused" and len(out["problems"]) == 1
    assert fragment in out["problems"][0] and "\n" not in out["problems"][0]


def test_a_factory_the_corpus_cannot_train_is_refused(leads_corpus, tmp_path):
    n = len(BlockStore(leads_corpus))
    lists = n // 39 + 1
    out = plan(_config(tmp_path, leads_corpus, f"index.factory=IVF{lists},Flat"), processes=1,
               device="cpu", machine=BIG)
    assert out["verdict"] == "refused"
    assert f"{lists} IVF lists need at least 39 x {lists}" in out["problems"][0]
    assert f"at most IVF{n // 39} fits" in out["problems"][0]
    check_factory(f"IVF{n // 39},Flat", 128, rows=n)  # one list fewer trains
    with pytest.raises(ConfigError, match="train_size"):
        check_factory("IVF100,Flat", 128, rows=10**6, train_size=3000)  # the sample counts
    # the same per process with index.sharding=ranks: each trains on its share
    with pytest.raises(ConfigError, match="cannot be trained"):
        check_plan(_config(tmp_path, leads_corpus, f"index.factory=IVF{n // 39},Flat",
                           "index.sharding=ranks"), blocks=n, processes=2)


def test_a_corpus_not_built_is_estimated_from_its_input(leads_corpus, shared_data):
    """300 lead sections blocked at 128 word pieces (the leads corpus fixture)."""
    from realm.config import DataConfig

    src = shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl"
    got = estimate_blocks(DataConfig(input=str(src), max_block_tokens=128, max_articles=300),
                          128)
    actual = len(BlockStore(leads_corpus))
    assert abs(got["blocks"] - actual) <= 0.2 * actual, (got, actual)
    assert "estimate from 300 articles" in got["blocks_from"]


def test_wikipedia_blocks_are_estimated_within_a_fifth(shared_data):
    """4,000 articles of the 2015 English Wikipedia at 128 word pieces: 126,121 blocks
    (docs/performance.md); the estimate reads 2,000 of them."""
    from realm.config import DataConfig

    src = shared_data / "wikipedia" / "enwiki2015_first30k_articles.jsonl.gz"
    if not src.exists():
        pytest.skip("no enwiki2015 sample here")
    got = estimate_blocks(DataConfig(input=str(src), max_block_tokens=128, max_articles=4000),
                          128)
    assert abs(got["blocks"] - 126_121) <= 0.2 * 126_121, got


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def test_the_plan_command_prints_one_json_object(leads_corpus, tmp_path):
    cmd = [sys.executable, "-m", "realm", "plan", "--config", str(REPO / "configs" /
           "pretrain.yaml"), override("corpus", leads_corpus),
           override("train.run_dir", str(tmp_path / "run"))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip())
    assert out["verdict"] == "fits" and out["blocks"] == len(BlockStore(leads_corpus))
    refused = subprocess.run(cmd + ["index.factory=IVF4096,Flat"], capture_output=True,
                             text=True, timeout=120, env=_env())
    assert refused.returncode == 1 and json.loads(refused.stdout)["verdict"] == "refused"
    errors = [line for line in refused.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("python -m realm plan: error: refused: ")
    assert "IVF4096,Flat" in errors[0]
    bert = subprocess.run([sys.executable, "-m", "realm", "plan", "--config",
                           str(REPO / "configs" / "realm_bert_base.yaml"),  # data.expected_blocks
                           "--processes", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env=_env())
    out = json.loads(bert.stdout.strip())
    assert out["blocks"] == 13353718 and out["blocks_from"].startswith("data.expected_blocks")
    assert out["index_bytes_per_rank"] < 0.2e9 and out["snapshot_bytes"] > 0.8e9  # BERT-base
    assert out["problems"] == [] or "memory" in out["problems"][0] or "disk" in out["problems"][0]


def test_pretraining_refuses_a_factory_the_corpus_cannot_train_before_anything_runs(
        leads_corpus, tmp_path):
    cmd = [sys.executable, "-m", "realm", "pretrain", "--config",
           str(REPO / "configs" / "pretrain.yaml"), override("corpus", leads_corpus),
           override("train.run_dir", str(tmp_path / "run")),
           override("cache_dir", str(tmp_path / "cache")), "index.factory=IVF4096,Flat"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "'IVF4096,Flat' cannot be trained on this corpus" in errors[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_pretraining_refuses_an_index_this_machine_cannot_hold(leads_corpus, tmp_path,
                                                               monkeypatch):
    import realm.index.plan as planner
    import realm.training.pretrain as pretrain
    from realm.training.pretrain import run_pretrain

    def no_preparation(config):  # (were the check missing, fail here, not after minutes)
        raise AssertionError("preparation started before the plan was checked")

    monkeypatch.setattr(pretrain, "prepare_encoder", no_preparation)
    monkeypatch.setattr(planner, "this_machine",
                        lambda run_dir: {**BIG, "memory_bytes": 1 << 16, "disk_path": run_dir})
    config = _config(tmp_path, leads_corpus, override("cache_dir", str(tmp_path / "cache")))
    with pytest.raises(ConfigError, match="does not fit this machine's memory") as refused:
        run_pretrain(config, progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
