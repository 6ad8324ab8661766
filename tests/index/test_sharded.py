"""The sharded index (``index.sharding=ranks``): two gloo processes, each holding half of a
generation, return exactly what one unsharded exact index returns."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from realm.index.sharded import ShardedSearch, merge_top_k, shard_range, torch_gather
from realm.refresh.rundir import RunStore

N_BLOCKS, DIM, K = 101, 16, 5


def test_shard_ranges_cover_every_row_once():
    for n, world in [(101, 2), (10, 3), (3, 4), (0, 2), (7, 1)]:
        ranges = [shard_range(n, r, world) for r in range(world)]
        rows = [i for start, end in ranges for i in range(start, end)]
        assert rows == list(range(n)), (n, world)
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2 of 2"):
        shard_range(10, 2, 2)


def test_merge_keeps_the_best_k_and_shard_order_on_ties():
    scores = np.array([[0.9, 0.5, -np.inf, 0.7, 0.5, 0.1]], dtype=np.float32)
    ids = np.array([[3, 4, -1, 60, 61, 62]])
    top_scores, top_ids = merge_top_k(scores, ids, 4)
    assert top_ids.tolist() == [[3, 60, 4, 61]]
    assert top_scores[0].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.5])


def _queries(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank 0 asks 7 questions, rank 1 asks 4 (uneven: padding is exercised), with exclusions."""
    rng = np.random.default_rng(10 + rank)
    n = 7 if rank == 0 else 4
    exclude = rng.integers(0, N_BLOCKS, size=(n, 2))
    exclude[0, 1] = -1
    return rng.standard_normal((n, DIM)).astype(np.float32), exclude


def _worker(rank: int, world: int, run_dir: str, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        store = RunStore(run_dir)
        generation = store.load_generation(0, corpus_fingerprint="fp", gpu=False,
                                           shard=(rank, world))
        search = ShardedSearch(lambda: generation, torch_gather(), rank)
        queries, exclude = _queries(rank)
        found = search(queries, K, exclude)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), ids=found.block_ids,
                 scores=found.scores, held=len(generation.embeddings),
                 first=int(generation.index.block_ids[0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard_blocks,halves", [(128, [(51, 0), (50, 51)]),  # one shard file
                                                (10, [(50, 0), (51, 50)])])  # whole shards each
def test_two_ranks_search_like_one_unsharded_exact_index(tmp_path, shard_blocks, halves):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((N_BLOCKS, DIM)).astype(np.float16)
    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(embeddings, encoder_step=0, corpus_fingerprint="fp",
                            shard_blocks=shard_blocks)
    whole = store.load_generation(0, corpus_fingerprint="fp", gpu=False)

    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "run"), init, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]

    for rank, (held, first) in enumerate(halves):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["held"]) == held and int(got["first"]) == first  # half each
        queries, exclude = _queries(rank)
        expected = whole.search(queries, K, exclude)
        np.testing.assert_array_equal(got["ids"], expected.block_ids)
        np.testing.assert_allclose(got["scores"], expected.scores, rtol=1e-6)
        assert not (got["ids"][:, :, None] == exclude[:, None, :]).any()  # exclusions held


def test_one_process_holds_one_shard_the_whole_index(tmp_path):
    rng = np.random.default_rng(1)
    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(rng.standard_normal((20, DIM)).astype(np.float16), encoder_step=0,
                            corpus_fingerprint="fp")
    generation = store.load_generation(0, corpus_fingerprint="fp", gpu=False, shard=(0, 1))
    whole = store.load_generation(0, corpus_fingerprint="fp", gpu=False)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    found = ShardedSearch(lambda: generation, lambda t: [t], 0)(queries, 4)
    np.testing.assert_array_equal(found.block_ids, whole.search(queries, 4).block_ids)
    with pytest.raises(ValueError, match="one shard"):
        generation.embeddings_of(np.array([0]))


def test_more_shards_than_blocks_is_an_error_naming_the_generation(tmp_path):
    from realm.errors import GenerationError

    store = RunStore(str(tmp_path / "run"))
    store.commit_generation(np.ones((1, DIM), np.float16), encoder_step=0, corpus_fingerprint="fp")
    with pytest.raises(GenerationError, match="gen-000000.*1 blocks cannot be split into 2"):
        store.load_generation(0, corpus_fingerprint="fp", gpu=False, shard=(1, 2))


def test_unknown_sharding_is_refused():
    from realm.errors import ConfigError
    from realm.config import load_config

    with pytest.raises(ConfigError, match="index.sharding"):
        load_config(None, ["index.sharding=everywhere"])


def test_prefetch_with_a_sharded_index_is_refused():
    """A sharded search is a collective: no background-thread search beside it, in the config
    and in the prefetcher itself."""
    from realm.errors import ConfigError
    from realm.config import load_config
    from realm.index.sharded import ShardedSearch
    from realm.training.prefetch import RetrievalPrefetch

    with pytest.raises(ConfigError, match="pretrain.prefetch.*sharding=ranks"):
        load_config(None, ["index.sharding=ranks", "pretrain.prefetch=true"])
    with pytest.raises(ValueError, match="collective"):
        RetrievalPrefetch(ShardedSearch(lambda: None, lambda t: [t], 0))
