"""Maximum inner-product search over block embeddings with faiss, chosen by factory string.

``"Flat"`` (exact, the default) needs no training; ``"HNSW32"``, ``"IVF1024,Flat"`` and
``"IVF1024,PQ32"`` are the usual choices for large corpora and are trained on (a sample of) the
embeddings when built. On machines where ``faiss.get_num_gpus() > 0`` the index can be moved to
one GPU or sharded across all of them; everywhere else it stays on the CPU.
"""

from __future__ import annotations

import io
import logging
import re
import time
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from realm.errors import ConfigError

logger = logging.getLogger(__name__)


def check_factory(factory: str, dim: int, rows: Optional[int] = None,
                  train_size: int = 262_144):  # -> faiss.Index (empty)
    """The empty faiss index ``factory`` makes for ``dim``-d vectors (inner product).

    Called by the stages before anything runs, so that a bad ``index.factory`` is one line at
    once, not a refresher that fails after the warm starts. Given ``rows`` (the vectors of one
    index: the corpus's blocks, or a process's share with ``index.sharding=ranks``), it also
    checks that the index can be trained on ``min(rows, train_size)`` of them.

    Raises:
        ConfigError: faiss cannot parse ``factory`` for ``dim`` (its reason quoted); or, with
            ``rows``, an IVF index with more lists than the training vectors / 39, or PQ
            codebooks with more centroids than training vectors.
    """
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        why = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", why)  # faiss's C++ location
        raise ConfigError(f"index.factory={factory!r} is not a faiss factory string for "
                          f"{dim}-d vectors (retriever.dim): {why}") from None
    if rows is not None and not index.is_trained:
        _check_trainable(index, factory, rows, train_size)
    return index


#: faiss's k-means wants at least this many training vectors per centroid (it warns below, and
#: the clusters it finds are poor); an IVF index of more lists than rows / 39 is refused.
MIN_POINTS_PER_CENTROID = 39


def _check_trainable(index, factory: str, rows: int, train_size: int) -> None:
    """:func:`check_factory`'s training check (a warning where faiss would train poorly)."""
    import faiss

    points = min(rows, train_size)
    fix = (f"each index trains on min(its blocks, index.train_size) = min({rows:,}, "
           f"{train_size:,}) = {points:,} vectors")
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        nlist = 0
    if nlist * MIN_POINTS_PER_CENTROID > points:
        raise ConfigError(f"index.factory={factory!r} cannot be trained on this corpus: {nlist:,} "
                          f"IVF lists need at least {MIN_POINTS_PER_CENTROID} x {nlist:,} = "
                          f"{nlist * MIN_POINTS_PER_CENTROID:,} training vectors, and {fix} "
                          f"(at most IVF{max(1, points // MIN_POINTS_PER_CENTROID)} fits; or "
                          "raise index.train_size, or use Flat or HNSW32)")
    pq = getattr(faiss.downcast_index(_inner_index(index)), "pq", None)
    if pq is not None:
        ksub = int(pq.ksub)
        if ksub > points:
            raise ConfigError(f"index.factory={factory!r} cannot be trained on this corpus: its "
                              f"PQ codebooks of {ksub} centroids need at least {ksub} training "
                              f"vectors, and {fix}")
        if ksub * MIN_POINTS_PER_CENTROID > points:
            logger.warning("index.factory=%r: PQ codebooks of %d centroids want %s training "
                           "vectors; %s", factory, ksub, f"{ksub * MIN_POINTS_PER_CENTROID:,}", fix)


def _inner_index(index):
    """The index inside a pre-transform or id map (else ``index``)."""
    import faiss

    index = faiss.downcast_index(index)
    while hasattr(index, "index") and not hasattr(index, "invlists") and \
            not hasattr(index, "hnsw"):
        index = faiss.downcast_index(index.index)
    return index


def index_bytes(factory: str, dim: int, n: int) -> int:
    """Memory of a ``factory`` index over ``n`` vectors of ``dim``, from its code sizes: the
    codes, 8-byte ids (IVF), coarse centroids, HNSW links. Within a few percent of faiss's own
    serialized size (Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 at 100k x 128:
    docs/performance.md); an unknown kind counts as float32 vectors."""
    import faiss

    index = check_factory(factory, dim)
    try:
        ivf = faiss.extract_index_ivf(index)
        return int(n * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + 256 * dim * 4)
    except (RuntimeError, AttributeError):
        pass
    inner = _inner_index(index)
    if hasattr(inner, "hnsw"):
        m = int(inner.hnsw.nb_neighbors(1))
        storage = int(faiss.downcast_index(inner.storage).code_size)
        links = 4 * (2 * m + m / max(1, m - 1))  # level 0 holds 2M neighbours; levels above ~M/(M-1)
        return int(n * (storage + links + 12))
    code_size = getattr(faiss.downcast_index(inner), "code_size", None)
    extra = 8 * n if type(faiss.downcast_index(index)).__name__.startswith("IndexIDMap") else 0
    return int(n * (code_size if code_size else 4 * dim) + extra)


def build_index(embeddings: np.ndarray, factory: str = "Flat"):  # -> faiss.Index
    """A bare inner-product faiss index over ``embeddings [n, dim]`` (``Flat``: exact search)."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index


class SearchResult(NamedTuple):
    """The one return type of every search in realm (:mod:`realm.retrieval.search`): top-k
    neighbours per query, best first; missing results (fewer than k candidates) have id -1.
    Unpacks as ``scores, block_ids = result``.

    Attributes:
        scores: ``[n_queries, k]`` float32 (a tensor with grad where the searcher scores with the
            live query encoder, e.g. a fixed dense index during Open-QA fine-tuning).
        block_ids: ``[n_queries, k]`` int64 block ids (rows of the block store).
    """

    scores: Any
    block_ids: np.ndarray


def search(index, queries: np.ndarray, k: int) -> SearchResult:
    """Top-``k`` of a faiss ``index`` (scores ``[n, k]`` float32, ids ``[n, k]`` int64, as the
    index numbers its rows); ``k`` is capped at the index size."""
    k = min(k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return SearchResult(scores, ids)


def num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu, or faiss-gpu on a machine without GPUs)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def exclusion_matrix(exclude, n: int) -> Optional[np.ndarray]:
    """``exclude`` (None, [n] ids, [n, m] ids, or n lists) as an int64 ``[n, m]`` matrix, -1 padded."""
    if exclude is None:
        return None
    if isinstance(exclude, np.ndarray) and exclude.ndim in (1, 2):
        matrix = exclude.reshape(len(exclude), -1).astype(np.int64)
    else:
        rows = [np.atleast_1d(np.asarray(e, dtype=np.int64)) for e in exclude]
        width = max((len(r) for r in rows), default=0)
        matrix = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            matrix[i, : len(r)] = r
    if len(matrix) != n:
        raise ValueError(f"exclude has {len(matrix)} rows for {n} queries")
    return matrix


class MipsIndex:
    """Inner-product index over block embeddings; positions map to block ids.

    Build with :meth:`build`; search with :meth:`search`. The index may live on the GPU(s); it is
    moved back to the CPU to be serialized.

    Args:
        index: A faiss index whose vectors are the rows of ``block_ids``, in order.
        block_ids: ``[ntotal]`` int64 block id of each vector (default ``arange(ntotal)``).
        factory: The faiss factory string it was built from.
    """

    def __init__(self, index, block_ids: Optional[np.ndarray] = None, factory: str = "Flat"):
        self.index = index
        self.factory = factory
        n = index.ntotal
        self.block_ids = (np.arange(n, dtype=np.int64) if block_ids is None
                          else np.asarray(block_ids, dtype=np.int64))
        if len(self.block_ids) != n:
            raise ValueError(f"{len(self.block_ids)} block ids for an index of {n} vectors")
        self.on_gpu = False

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        factory: str = "Flat",
        block_ids: Optional[np.ndarray] = None,
        *,
        train_size: int = 262_144,
        nprobe: int = 32,
        ef_search: int = 128,
        gpu: bool = True,
        gpu_device: Optional[int] = None,
        seed: int = 0,
    ) -> "MipsIndex":
        """Index ``embeddings [n, dim]`` (float16 or float32) with ``faiss.index_factory``.

        Args:
            embeddings: One row per block.
            factory: faiss factory string (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ32``).
            block_ids: Block id of each row (default: row numbers).
            train_size: Rows sampled to train indexes that need training (IVF, PQ).
            nprobe: IVF lists visited per query.
            ef_search: HNSW search breadth.
            gpu: Move the index to the GPU(s) when faiss sees any (else ignored).
            gpu_device: Put it on this one GPU (a shard on its process's ``LOCAL_RANK`` GPU);
                None: on all of them, sharded.
            seed: Seed of the training sample.
        """
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise ValueError(f"embeddings must be a non-empty [n, dim] array, got {embeddings.shape}")
        n, dim = embeddings.shape
        index = check_factory(factory, dim)
        if not index.is_trained:
            rows = np.random.default_rng(seed).permutation(n)[:train_size] if n > train_size \
                else np.arange(n)
            t0 = time.perf_counter()
            index.train(np.ascontiguousarray(embeddings[np.sort(rows)], dtype=np.float32))
            logger.info("trained %s on %d vectors in %.1fs", factory, len(rows),
                        time.perf_counter() - t0)
        for start in range(0, n, 65536):  # add in chunks: fp16 -> fp32 copies stay small
            index.add(np.ascontiguousarray(embeddings[start:start + 65536], dtype=np.float32))
        mips = cls(index, block_ids, factory)
        mips.set_search_params(nprobe=nprobe, ef_search=ef_search)
        if gpu and num_gpus() > 0:
            mips.to_gpus(gpu_device)
        return mips

    def set_search_params(self, nprobe: int = 32, ef_search: int = 128) -> None:
        """Search breadth of IVF (``nprobe``) and HNSW (``efSearch``) indexes; no-op for Flat."""
        import faiss

        base = self.index
        try:
            ivf = faiss.extract_index_ivf(base)
            ivf.nprobe = min(nprobe, ivf.nlist)
        except (RuntimeError, AttributeError):
            pass
        hnsw = faiss.downcast_index(base)
        if hasattr(hnsw, "hnsw"):
            hnsw.hnsw.efSearch = ef_search

    def to_gpus(self, device: Optional[int] = None) -> None:
        """Move the index to the GPU (``device``; None: sharded across all of them when there
        are several)."""
        import faiss

        ngpu = num_gpus()
        if ngpu == 0 or self.on_gpu:
            return
        if device is not None and not 0 <= device < ngpu:
            raise ValueError(f"GPU {device} for the index, but faiss sees {ngpu}")
        try:
            if ngpu == 1 or device is not None:
                self._gpu_res = faiss.StandardGpuResources()
                self.index = faiss.index_cpu_to_gpu(self._gpu_res, device or 0, self.index)
            else:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True
                self.index = faiss.index_cpu_to_all_gpus(self.index, co=options, ngpu=ngpu)
            self.on_gpu = True
            logger.info("%s index on %s", self.factory,
                        f"GPU {device}" if device is not None else f"{ngpu} GPU(s)")
        except RuntimeError as e:  # e.g. HNSW has no GPU implementation
            logger.warning("%s index stays on the CPU: %s", self.factory, str(e).strip()[:200])

    def cpu_index(self):
        """The index as a CPU faiss index (a copy when it lives on the GPU)."""
        import faiss

        return faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    def search(self, queries: np.ndarray, k: int, exclude=None) -> SearchResult:
        """Top-``k`` blocks for each query, optionally leaving out given blocks per query.

        Args:
            queries: ``[n, dim]`` query embeddings.
            k: Neighbours per query (results past the index size have id -1, score -inf).
            exclude: Block ids to leave out of each query's results: ``[n]`` (one per query,
                REALM's "the block this example came from"), ``[n, m]`` padded with -1, or a
                list of n sequences.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {queries.shape}")
        n = len(queries)
        excl = exclusion_matrix(exclude, n)
        extra = 0 if excl is None else int((excl >= 0).sum(axis=1).max(initial=0))
        fetch = min(k + extra, self.ntotal)
        scores, pos = self.index.search(queries, fetch)  # [n, fetch]
        ids = np.where(pos >= 0, self.block_ids[np.maximum(pos, 0)], -1)  # [n, fetch]
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        if excl is not None and extra > 0:
            drop = (ids[:, :, None] == excl[:, None, :]).any(axis=2) & (ids >= 0)  # [n, fetch]
            # stable sort moves dropped entries to the end, keeping the score order of the rest
            order = np.argsort(drop, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
            dropped = np.take_along_axis(drop, order, axis=1)
            ids[dropped] = -1
            scores[dropped] = -np.inf
        ids, scores = ids[:, :k], scores[:, :k]
        if ids.shape[1] < k:  # fewer vectors than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return SearchResult(scores=scores, block_ids=ids)

    @classmethod
    def from_rows(cls, chunks: Iterable[np.ndarray], n: int, dim: int,
                  block_ids: Optional[np.ndarray] = None, *, gpu: bool = True,
                  gpu_device: Optional[int] = None, **search_params) -> "MipsIndex":
        """An exact (``Flat``) index over ``n`` rows that arrive in ``chunks`` (float16 or float32
        ``[m, dim]`` arrays, in order), written straight into the index's own storage: the peak
        memory is the index plus one chunk, never a second copy of the rows.

        Raises:
            ValueError: the chunks hold another number of rows than ``n``.
        """
        import faiss

        index = faiss.IndexFlatIP(dim)
        nbytes = n * dim * 4
        index.codes.resize(nbytes)  # [n, dim] float32, allocated once
        storage = faiss.rev_swig_ptr(index.codes.data(), nbytes).view(np.float32).reshape(n, dim)
        filled = 0
        for chunk in chunks:
            if filled + len(chunk) > n:
                raise ValueError(f"more than {n} rows for the index")
            storage[filled:filled + len(chunk)] = chunk  # (float16 -> float32 in place)
            filled += len(chunk)
        if filled != n:
            raise ValueError(f"{filled} rows for an index of {n}")
        index.ntotal = n
        del storage
        mips = cls(index, block_ids, "Flat")
        if gpu and num_gpus() > 0:
            mips.to_gpus(gpu_device)
        return mips

    @classmethod
    def read(cls, path: str, fs=None, block_ids: Optional[np.ndarray] = None,
             factory: str = "Flat", gpu: bool = True, gpu_device: Optional[int] = None,
             **search_params) -> "MipsIndex":
        """The index faiss serialized at ``path``: read by faiss straight from a local file
        (no bytes copy), through ``fs`` (an fsspec file system) otherwise."""
        from fsspec.implementations.local import LocalFileSystem

        if fs is not None and not isinstance(fs, LocalFileSystem):
            return cls.from_bytes(fs.cat_file(path), block_ids, factory, gpu=gpu,
                                  gpu_device=gpu_device, **search_params)
        import faiss

        mips = cls(faiss.read_index(path), block_ids, factory)
        mips.set_search_params(**search_params)
        if gpu and num_gpus() > 0:
            mips.to_gpus(gpu_device)
        return mips

    # -- persistence: bytes, so that any fsspec file system can hold them ------------------

    def to_bytes(self) -> bytes:
        """The (CPU) index serialized by faiss."""
        import faiss

        return faiss.serialize_index(self.cpu_index()).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, block_ids: Optional[np.ndarray] = None,
                   factory: str = "Flat", gpu: bool = True, gpu_device: Optional[int] = None,
                   **search_params) -> "MipsIndex":
        import faiss

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        mips = cls(index, block_ids, factory)
        mips.set_search_params(**search_params)
        if gpu and num_gpus() > 0:
            mips.to_gpus(gpu_device)
        return mips


def array_to_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def array_from_bytes(data: bytes, what: str = "array") -> np.ndarray:
    """Inverse of :func:`array_to_bytes`; a clear error for truncated or foreign data."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{what}: not a readable .npy array ({e})") from None


def exact_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found by an approximate search (both ``[n, k]``)."""
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / max(1, exact_ids.size))


__all__: Sequence[str] = ["MipsIndex", "SearchResult", "build_index", "search", "num_gpus",
                          "array_to_bytes", "array_from_bytes", "exact_recall", "check_factory",
                          "index_bytes", "MIN_POINTS_PER_CENTROID"]
