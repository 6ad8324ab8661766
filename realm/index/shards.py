"""The embeddings of an index generation as shard files, and how a reader streams its rows.

A generation (format 2) stores its ``[n_blocks, dim]`` float16 embeddings as shard files of
consecutive rows, ``embeddings-00000.f16``, ``embeddings-00001.f16``...: raw little-endian
float16, no header, so a shard of ``r`` rows is exactly ``r * dim * 2`` bytes. The manifest lists
each shard's rows (``start``, ``end``) and, under ``files``, its size and sha256. Each refresher
process writes its own shards; a trainer process reads (and checks) only the shards that hold its
rows, in chunks, so loading never holds a second copy of what it keeps.

Format 1 generations (one ``embeddings.npy`` and ``block_ids.npy``) read through the same path:
their embeddings file is one segment whose rows start after the ``.npy`` header.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from realm.errors import GenerationError
from realm.index.sharded import shard_range

#: Rows of a shard file; the refresher's unit of work and of resume (``index.shard_blocks``).
SHARD_BLOCKS = 131072
SHARD_PATTERN = re.compile(r"^embeddings-(\d{5,})\.f16$")
#: Bytes read at a time while streaming a shard (whole rows, about this many).
CHUNK_BYTES = 4 << 20


def shard_file(index: int) -> str:
    return f"embeddings-{index:05d}.f16"


def shard_bounds(n: int, shard_blocks: int) -> list[tuple[int, int]]:
    """``[start, end)`` rows of each shard of ``n`` rows, ``shard_blocks`` rows each (the last
    shorter); one empty-free list, at least one shard when ``n > 0``."""
    if shard_blocks < 1:
        raise ValueError(f"shard_blocks must be >= 1, got {shard_blocks}")
    return [(start, min(start + shard_blocks, n)) for start in range(0, n, shard_blocks)]


def rows_to_bytes(rows: np.ndarray) -> bytes:
    """``[r, dim]`` rows as a shard file's bytes (little-endian float16)."""
    return np.ascontiguousarray(rows, dtype="<f2").tobytes()


def file_info(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class Segment:
    """One file holding rows ``[start, end)`` of a generation, the first at byte ``offset``
    (0 for a shard file; the header's length for a format-1 ``embeddings.npy``)."""

    file: str
    start: int
    end: int
    bytes: int
    sha256: str
    offset: int = 0


def segments_of(manifest: dict[str, Any], where: str) -> list[Segment]:
    """The row segments a generation manifest lists, checked to cover rows ``0..n_blocks`` once.
    Format 1: the one ``embeddings.npy`` (its header length is found when it is read)."""
    n, files = int(manifest["n_blocks"]), manifest["files"]
    if "shards" not in manifest:
        info = files.get("embeddings.npy")
        if info is None:
            raise GenerationError(f"{where}/manifest.json: lists no embeddings: refused as corrupt")
        return [Segment("embeddings.npy", 0, n, int(info["bytes"]), info["sha256"], offset=-1)]
    out, row = [], 0
    for shard in manifest["shards"]:
        name, start, end = shard.get("file"), shard.get("start"), shard.get("end")
        if not (isinstance(name, str) and SHARD_PATTERN.match(name) and name in files
                and start == row and isinstance(end, int) and end > start):
            raise GenerationError(f"{where}/manifest.json: shard {shard!r} does not follow row "
                                  f"{row} or is not listed in its files: refused as corrupt")
        info = files[name]
        out.append(Segment(name, start, end, int(info["bytes"]), info["sha256"]))
        row = end
    if row != n:
        raise GenerationError(f"{where}/manifest.json: shards cover {row} rows of {n}: refused "
                              "as corrupt")
    return out


def rank_rows(segments: list[Segment], n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` that process ``rank`` of ``world`` holds (``index.sharding=ranks``).

    With at least as many shard files as processes, whole shards: each boundary of
    :func:`realm.index.sharded.shard_range` moves to the nearest shard boundary, so a process
    reads no other process's rows (sizes differ by at most about one shard). With fewer, the
    rows of :func:`shard_range` (a process reads the shards its rows lie in).
    """
    edges = [s.start for s in segments] + [n]

    def snap(row: int) -> int:
        return min(edges, key=lambda e: (abs(e - row), e))

    start, end = shard_range(n, rank, world)
    if len(segments) >= world:
        cuts = [snap(shard_range(n, r, world)[0]) for r in range(world)] + [n]
        if all(a < b for a, b in zip(cuts, cuts[1:])):  # every process keeps a shard
            return cuts[rank], cuts[rank + 1]
    return start, end


def npy_offset(head: bytes, where: str) -> int:
    """Where the rows of a ``.npy`` file start, from its first bytes (format 1 generations)."""
    import io

    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(buf)
    except (ValueError, EOFError) as e:
        raise GenerationError(f"{where}: not a readable .npy array ({e})") from None
    if fortran or np.dtype(dtype) != np.dtype("<f2") or len(shape) != 2:
        raise GenerationError(f"{where}: {dtype} {shape}, not C-ordered [n, dim] float16")
    return buf.tell()


def stream_rows(fs, path: str, segment: Segment, dim: int, want: tuple[int, int], *,
                verify: bool = True, chunk_bytes: int = CHUNK_BYTES
                ) -> Iterator[np.ndarray]:
    """The rows of ``segment`` inside ``want`` (global rows ``[a, b)``), in order, as float16
    ``[m, dim]`` arrays of at most about ``chunk_bytes``: views of one reused buffer, valid until
    the next one is asked for (copy what you keep).

    With ``verify`` the whole file is read (and its sha256 checked once it ends: a consumer
    keeps nothing it read before the generator finished); without, only the wanted rows.

    Raises:
        GenerationError: the file is missing, of another size, or its sha256 differs.
    """
    lo, hi = max(want[0], segment.start), min(want[1], segment.end)
    row_bytes = dim * 2
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise GenerationError(f"{path}: listed in the manifest but missing") from None
    with f:
        sha = hashlib.sha256()
        offset = segment.offset
        if offset < 0:  # a format-1 .npy: the rows start after its header
            head = f.read(min(segment.bytes, 1 << 16))
            offset = npy_offset(head, path)
            f.seek(0)
        if offset + (segment.end - segment.start) * row_bytes != segment.bytes:
            raise GenerationError(f"{path}: {segment.bytes} bytes for {segment.end - segment.start}"
                                  f" rows of {dim} float16: refused as corrupt")
        if verify:
            sha.update(f.read(offset))
            first = segment.start
        else:
            first = lo
            f.seek(offset + (lo - segment.start) * row_bytes)
        rows_per_read = max(1, chunk_bytes // row_bytes)
        buffer = bytearray(rows_per_read * row_bytes)  # one buffer, refilled: no copies pile up
        row, read = first, offset if verify else 0
        last = segment.end if verify else hi
        while row < last:
            want_rows = min(rows_per_read, last - row)
            view = memoryview(buffer)[:want_rows * row_bytes]
            got_bytes = _read_into(f, view)
            if verify:
                sha.update(view[:got_bytes])
            read += got_bytes
            got = got_bytes // row_bytes
            if got < want_rows:
                raise GenerationError(f"{path}: {read} bytes, manifest says {segment.bytes} "
                                      "(truncated?)")
            a, b = max(row, lo), min(row + got, hi)
            if a < b:  # (a view of the buffer: use it before the next chunk)
                block = np.frombuffer(view, dtype="<f2").reshape(got, dim)
                yield block[a - row:b - row]
            row += got
        if verify:
            if f.read(1):
                raise GenerationError(f"{path}: longer than the manifest's {segment.bytes} bytes")
            if sha.hexdigest() != segment.sha256:
                raise GenerationError(f"{path}: sha256 differs from the manifest (corrupted)")


def _read_into(f, view: memoryview) -> int:
    """Fill ``view`` from ``f`` (fewer bytes only at the end of the file)."""
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def check_file(fs, path: str, info: dict[str, Any], verify: bool = True,
               chunk_bytes: int = CHUNK_BYTES) -> None:
    """Raise :class:`GenerationError` unless the file at ``path`` has the manifest's size (and,
    with ``verify``, sha256); read in chunks, nothing kept."""
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise GenerationError(f"{path}: listed in the manifest but missing") from None
    size, sha = 0, hashlib.sha256()
    with f:
        while True:
            data = f.read(chunk_bytes) if verify else b""
            if not data:
                break
            size += len(data)
            sha.update(data)
    if not verify:
        size = fs.size(path)
    if size != info["bytes"]:
        raise GenerationError(f"{path}: {size} bytes, manifest says {info['bytes']} (truncated?)")
    if verify and sha.hexdigest() != info["sha256"]:
        raise GenerationError(f"{path}: sha256 differs from the manifest (corrupted)")


def read_segment_rows(fs, where: str, segments: list[Segment], dim: int,
                      rows: tuple[int, int], verify: bool = True,
                      out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``[a, b)`` of a generation as one float16 ``[b - a, dim]`` array (``out`` if given),
    read from the segments that hold them."""
    a, b = rows
    out = np.empty((b - a, dim), dtype=np.float16) if out is None else out
    filled = 0
    for chunk in iter_rows(fs, where, segments, dim, rows, verify):
        out[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return out


def iter_rows(fs, where: str, segments: list[Segment], dim: int, rows: tuple[int, int],
              verify: bool = True) -> Iterator[np.ndarray]:
    """Rows ``[a, b)`` in order, in chunks, from the segments that hold them (only those are
    opened)."""
    for segment in segments:
        if segment.end <= rows[0] or segment.start >= rows[1]:
            continue
        yield from stream_rows(fs, f"{where}/{segment.file}", segment, dim, rows, verify=verify)


__all__ = ["SHARD_BLOCKS", "SHARD_PATTERN", "Segment", "shard_file", "shard_bounds",
           "rows_to_bytes", "file_info", "segments_of", "rank_rows", "stream_rows", "check_file",
           "iter_rows", "read_segment_rows", "npy_offset"]
