"""GPU tests (marked ``gpu``; skipped without CUDA): an index shard on its process's GPU with
faiss-gpu, fp16 training with accelerate's loss scaling, and where the refresher's devices go.

    pytest -m gpu tests/test_gpu.py      # on a machine with a CUDA GPU
"""

import numpy as np
import pytest
import torch

from realm.refresh.rundir import RunStore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _faiss_gpus() -> int:
    from realm.index.mips import num_gpus

    return num_gpus()


def test_a_shard_on_its_gpu_searches_like_the_cpu(tmp_path):
    if _faiss_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu is installed; faiss-gpu puts shards on GPUs)")
    rng = np.random.default_rng(0)
    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(rng.standard_normal((1000, 32)).astype(np.float16), encoder_step=0,
                            corpus_fingerprint="fp")
    queries = rng.standard_normal((16, 32)).astype(np.float32)
    on_cpu = store.load_generation(0, corpus_fingerprint="fp", gpu=False, shard=(1, 2))
    on_gpu = store.load_generation(0, corpus_fingerprint="fp", gpu=True, shard=(1, 2),
                                   gpu_device=_faiss_gpus() - 1)
    assert on_gpu.index.on_gpu and not on_cpu.index.on_gpu
    np.testing.assert_array_equal(on_gpu.search(queries, 8).block_ids,
                                  on_cpu.search(queries, 8).block_ids)
    with pytest.raises(ValueError, match="GPU 99 for the index"):
        store.load_generation(0, corpus_fingerprint="fp", gpu=True, shard=(0, 2), gpu_device=99)


class _SumOfInputs:
    """Learn y = x1 + ... + x4 from rows of random x (the rows are the dataset)."""

    def __init__(self):
        self.rows = list(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))

    def train_dataset(self):
        return self.rows

    def collate(self, rows):
        return torch.stack(rows)

    def loss(self, model, x):
        x = x.to(next(model.parameters()).device)
        return torch.nn.functional.mse_loss(model(x).float(), x.sum(dim=1, keepdim=True)), {}

    def evaluate(self, model):
        return {}


def test_fp16_trains_with_loss_scaling(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from realm.tracking import Tracker, read_metrics
    from realm.training.core import TrainSettings, train
    from realm.precision import training_precision
    from realm.training.accelerator import shutdown

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision
    precision = training_precision("auto", torch.device("cuda"))
    assert precision == "fp16"
    accelerator = Accelerator(mixed_precision=precision)
    assert accelerator.scaler is not None  # the loss scaler fp16 needs
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    settings = TrainSettings(run_dir=str(tmp_path), steps=20, batch_size=16, lr=1e-2,
                             log_every=1, progress=False)
    tracker = Tracker(str(tmp_path))
    try:
        train(model, _SumOfInputs(), settings, accelerator, tracker)
    finally:
        tracker.close()
        shutdown(accelerator)
    losses = [r["loss"] for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_refresher_devices_are_checked_and_placed():
    from realm.errors import ConfigError
    from realm.refresh.supervisor import check_devices, placement

    count = torch.cuda.device_count()
    check_devices([f"cuda:{count - 1}"])
    with pytest.raises(ConfigError, match=f"cuda:{count} does not exist"):
        check_devices([f"cuda:{count}"])
    processes, env, overrides = placement([f"cuda:{i}" for i in range(count)])
    assert processes == count and overrides == ["refresh.device=auto"]
    assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == count
