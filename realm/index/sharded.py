"""An index generation sharded across the training processes (``index.sharding=ranks``).

Each of N processes holds rows ``shard_range(n_blocks, rank, N)`` of every generation: 1/N of the
embeddings and its own faiss index over them (on its ``LOCAL_RANK`` GPU where faiss sees one).
A search is a collective that every process calls once per step, as Atlas's distributed index
does: the queries of all processes are gathered, every process searches its shard for all of
them, the per-shard top k are gathered and merged, and each process keeps its own rows. With an
exact (``Flat``) index the result is the one unsharded search's; approximate factories are built
(and trained) per shard.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

from realm.index.mips import SearchResult, exclusion_matrix

logger = logging.getLogger(__name__)

#: ``gather(tensor) -> [one tensor per process]``, all of the same shape (a collective).
Gather = Callable[[torch.Tensor], list[torch.Tensor]]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``n`` that process ``rank`` of ``world`` holds (contiguous, sizes
    differing by at most one)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} processes")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def torch_gather(device: Optional[torch.device] = None) -> Gather:
    """:data:`Gather` over the default torch.distributed group (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        local = tensor.to(device) if device is not None else tensor
        out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(out, local.contiguous())
        return [t.cpu() for t in out]

    return gather


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best candidates (from several shards, or re-scored ones).

    Args:
        scores: ``[n, c]`` float32, -inf for no candidate (e.g. shards side by side).
        ids: ``[n, c]`` int64 block ids, -1 for no candidate.

    Returns:
        ``(scores [n, k], ids [n, k])``, best first; ties keep the order of the columns (lower
        shards first, as the rows of one unsharded index).
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedSearch:
    """The searcher of a process that holds one shard of the generation in use.

    Every process must call it the same number of times, in the same order (once per step in
    pretraining): each call is four or five all-gathers.

    Args:
        current: Returns the generation in use (its index holds this process's shard, with
            global block ids).
        gather: The collective (:func:`torch_gather`).
        rank: This process's place among them.
    """

    #: every process must call it, in the same order (no background-thread searches)
    collective = True

    def __init__(self, current: Callable[[], object], gather: Gather, rank: int):
        self.current = current
        self.gather = gather
        self.rank = rank

    def search(self, queries: np.ndarray, k: int, exclude=None) -> SearchResult:
        generation = self.current()
        if generation is None:
            raise RuntimeError("no index generation in use yet (call wait_for_first)")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, dim = queries.shape
        excl = exclusion_matrix(exclude, n)
        width = 0 if excl is None else excl.shape[1]
        # 1. sizes, and the generation each process searches (they must agree)
        sizes = torch.stack(self.gather(torch.tensor([n, width, generation.generation, k],
                                                     dtype=torch.int64)))  # [world, 4]
        gens, ks = set(sizes[:, 2].tolist()), set(sizes[:, 3].tolist())
        if len(gens) > 1 or len(ks) > 1:
            raise RuntimeError(f"sharded search: the processes search generations {sorted(gens)} "
                               f"with k {sorted(ks)}; all must search the same (agreed swaps)")
        rows = sizes[:, 0].tolist()
        most, widest = max(rows), int(sizes[:, 1].max())
        # 2. everyone's queries (and exclusions), padded to the longest
        padded = np.zeros((most, dim), dtype=np.float32)
        padded[:n] = queries
        exclusions = np.full((most, widest), -1, dtype=np.int64)
        if excl is not None:
            exclusions[:n, :width] = excl
        all_queries = torch.cat(self.gather(torch.from_numpy(padded))).numpy()  # [world*most, dim]
        all_excl = (torch.cat(self.gather(torch.from_numpy(exclusions))).numpy()
                    if widest else None)
        # 3. this shard's top k for all of them; everyone's, merged
        found = generation.index.search(all_queries, k, all_excl)  # [world*most, k]
        scores = torch.stack(self.gather(torch.from_numpy(found.scores)))  # [world, world*most, k]
        ids = torch.stack(self.gather(torch.from_numpy(found.block_ids)))
        mine = slice(self.rank * most, self.rank * most + n)
        cand_scores = scores[:, mine].permute(1, 0, 2).reshape(n, -1).numpy()  # [n, world*k]
        cand_ids = ids[:, mine].permute(1, 0, 2).reshape(n, -1).numpy()
        top_scores, top_ids = merge_top_k(cand_scores, cand_ids, k)
        return SearchResult(scores=top_scores, block_ids=top_ids)

    __call__ = search  # REALM and the index negatives take the search as a callable


__all__ = ["ShardedSearch", "shard_range", "merge_top_k", "torch_gather", "Gather"]
