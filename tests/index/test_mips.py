"""The faiss wrapper: exact search against numpy, exclusion, trained factories, round trips."""

import numpy as np
import pytest

from realm.index.mips import MipsIndex, exact_recall


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 24)).astype(np.float32), rng.normal(size=(50, 24)).astype(np.float32)


def _topk(base, queries, k):
    scores = queries @ base.T  # [n_queries, n_base]
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_exact_search_matches_numpy_and_maps_block_ids(vectors):
    base, queries = vectors
    block_ids = np.arange(len(base)) * 10 + 7  # rows are not block ids
    result = MipsIndex.build(base, "Flat", block_ids).search(queries, 5)
    assert result.block_ids.shape == (50, 5) and result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.block_ids, block_ids[_topk(base, queries, 5)])
    np.testing.assert_allclose(result.scores[:, 0], (queries @ base.T).max(axis=1), rtol=1e-5)


def test_exclusion_drops_given_blocks_and_keeps_k(vectors):
    base, queries = vectors
    index = MipsIndex.build(base)
    top = _topk(base, queries, 8)
    # REALM: leave out each query's own block (here: its top hit), one id per query
    result = index.search(queries, 5, exclude=top[:, 0])
    np.testing.assert_array_equal(result.block_ids, top[:, 1:6])
    # several per query, ragged lists; ids absent from the results change nothing
    exclude = [[int(t[0]), int(t[2])] for t in top[:10]] + [[123456]] * 40
    result = index.search(queries, 4, exclude=exclude)
    np.testing.assert_array_equal(result.block_ids[:10], top[:10][:, [1, 3, 4, 5]])
    np.testing.assert_array_equal(result.block_ids[10:], top[10:, :4])


def test_k_past_the_index_size_pads_with_minus_one():
    base = np.eye(3, 4, dtype=np.float32)
    result = MipsIndex.build(base).search(base[:1], 5, exclude=[0])
    assert sorted(result.block_ids[0, :2].tolist()) == [1, 2]  # a tie at score 0
    assert result.block_ids[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(result.scores[0, 2:]).all()


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["HNSW16", "IVF8,Flat", "IVF8,PQ8"])
def test_trained_factories_round_trip_and_recall(vectors, factory):
    base, queries = vectors
    exact = MipsIndex.build(base).search(queries, 10).block_ids
    index = MipsIndex.build(base.astype(np.float16), factory, nprobe=8)  # float16, as stored
    again = MipsIndex.from_bytes(index.to_bytes(), factory=factory, nprobe=8)
    np.testing.assert_array_equal(again.search(queries, 10).block_ids,
                                  index.search(queries, 10).block_ids)
    floor = {"HNSW16": 0.8, "IVF8,Flat": 0.95, "IVF8,PQ8": 0.2}[factory]
    assert exact_recall(index.search(queries, 10).block_ids, exact) >= floor


def test_bad_factory_and_query_shape_are_named(vectors):
    base, queries = vectors
    with pytest.raises(ValueError, match="index.factory='NoSuch'"):
        MipsIndex.build(base, "NoSuch")
    with pytest.raises(ValueError, match=r"queries must be \[n, 24\]"):
        MipsIndex.build(base).search(queries[:, :5], 3)


def test_exact_recall_counts_overlap():
    assert exact_recall(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)


def test_a_factory_faiss_cannot_build_is_a_config_error_in_one_line():
    from realm.errors import ConfigError
    from realm.index.mips import check_factory

    assert check_factory("IVF4,Flat", 16).d == 16
    with pytest.raises(ConfigError, match=r"index.factory='PQ7' .* 16-d vectors") as bad:
        check_factory("PQ7", 16)  # a dimension PQ7 cannot split
    assert "\n" not in str(bad.value) and ".cpp" not in str(bad.value)
