"""benchmarks/scale_rehearsal.py and benchmarks/gpu_check.py run: the rehearsal at a tiny size
(its JSON and what the store wrote), the GPU check's one line where there is no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--output",
                           str(tmp_path / "out.json")], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 0 and done.stdout.count("\n") == 1, done.stderr[-2000:]
    assert "no CUDA GPU" in done.stdout and not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_the_rehearsal_at_a_tiny_size(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_rehearsal.py"),
                           "--blocks", "30000", "--dim", "32", "--shard-blocks", "4096",
                           "--queries", "64", "--swap-steps", "4", "--swap-every", "2",
                           "--warmup", "1", "--threads", "1", "--real-articles", "0",
                           "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["generation_bytes"] == 30000 * 32 * 2  # float16 shards, nothing else
    replicated, ranks = out["load"]["replicated"], out["load"]["sharded_2"]
    assert replicated["rows"] == [0, 30000] and replicated["index_bytes"] == 30000 * 32 * 4
    assert [r["rows"] for r in ranks] == [[0, 16384], [16384, 30000]]  # whole shards each
    for key in ("commit_s", "load_s", "peak_rss_ratio", "search_ms_per_512", "swap_max_ratio",
                "swap_median_ratio"):
        assert out[key] > 0, key


@pytest.mark.slow
def test_the_real_refresh_part_resumes_a_killed_refresh_and_leaves_no_temp_dir(
        shared_data, tmp_path):
    """The real refresh on 12 lead sections: one full refresh, one killed after 90% of its
    shards and resumed (it embeds only the missing shards); the default temp directory is
    removed at the end."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_rehearsal.py"),
                           "--blocks", "5000", "--dim", "16", "--shard-blocks", "2048",
                           "--queries", "8", "--swap-steps", "2", "--swap-every", "1",
                           "--warmup", "1", "--threads", "1", "--real-articles", "12",
                           "--real-input", str(shared_data / "wikipedia" /
                                               "vital_level4_summaries_en.jsonl"),
                           "--real-shard-blocks", "4"], capture_output=True, text=True,
                          timeout=300, env={**_env(), "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    real = json.loads(done.stdout.strip().splitlines()[-1])["real"]
    assert real["articles"] == 12 and real["blocks"] >= 12 and real["shard_blocks"] == 4
    shards = -(-real["blocks"] // 4)
    resumed = real["resumed"]
    assert resumed["of_shards"] == shards and resumed["killed_after_shards"] == int(0.9 * shards)
    assert resumed["shards_resumed"] == resumed["killed_after_shards"]
    assert resumed["blocks_embedded"] == real["blocks"] - 4 * resumed["killed_after_shards"]
    assert real["plan"]["generation_bytes"] == real["plan"]["generation_bytes_on_disk"]
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("realm-rehearsal-")]
