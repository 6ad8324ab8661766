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
