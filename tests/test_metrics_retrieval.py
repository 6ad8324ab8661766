"""recall@k and hit matrices on hand-made inputs."""

import numpy as np
import pytest

from realm.metrics import answer_hits, gold_hits, recall_at_k
from realm.metrics import paired_recall

# 5 queries x 4 ranks; first hit at ranks 0, 1, 3, none, 0
HITS = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
        [1, 1, 1, 1],
    ],
    dtype=bool,
)


def test_recall_at_k_hand_made():
    assert recall_at_k(HITS, [1, 2, 3, 4]) == {"1": 0.4, "2": 0.6, "3": 0.6, "4": 0.8}


def test_recall_at_k_keeps_order_of_ks():
    assert list(recall_at_k(HITS, [4, 1])) == ["4", "1"]


@pytest.mark.parametrize("k", [0, 5])
def test_recall_at_k_rejects_k_outside_columns(k):
    with pytest.raises(ValueError, match=f"k={k} is outside 1..4"):
        recall_at_k(HITS, [k])


def test_recall_at_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="non-empty"):
        recall_at_k(np.zeros((0, 3), dtype=bool), [1])
    with pytest.raises(ValueError, match="non-empty"):
        recall_at_k(np.zeros(3, dtype=bool), [1])


def test_answer_hits_strings_and_padding():
    texts = [
        ["a dog barks", "the cat sat", "cat again"],
        ["concatenate", "nothing"],  # shorter list: padded with False
    ]
    hits = answer_hits(texts, [["Cat"], ["cat"]])
    expected = np.array([[False, True, True], [False, False, False]])
    assert hits.dtype == bool
    np.testing.assert_array_equal(hits, expected)


def test_answer_hits_regex():
    hits = answer_hits([["born 1879", "born in Ulm"]], [[r"\d{4}"]], regex=True)
    np.testing.assert_array_equal(hits, [[True, False]])


def test_answer_hits_length_mismatch():
    with pytest.raises(ValueError, match="retrieved_texts has 1 queries but answers has 2"):
        answer_hits([["x"]], [["x"], ["y"]])


def test_gold_hits_ids_and_sets():
    retrieved = np.array([[3, 7, 1], [2, 5, 9], [4, 4, 0]], dtype=np.int64)
    gold = [7, {9, 2}, [8]]  # single id, a set, a list
    expected = np.array([[False, True, False], [True, False, True], [False, False, False]])
    np.testing.assert_array_equal(gold_hits(retrieved, gold), expected)
    # recall over that matrix: queries 0 and 1 hit by rank 2
    assert recall_at_k(gold_hits(retrieved, gold), [1, 2]) == {"1": 1 / 3, "2": 2 / 3}


def test_gold_hits_string_ids_are_single_ids():
    hits = gold_hits([["squad-dev-1", "squad-dev-0"]], ["squad-dev-0"])
    np.testing.assert_array_equal(hits, [[False, True]])


def test_paired_recall_counts_each_side_and_signs_the_difference():
    after = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
                     dtype=bool)
    out = paired_recall(HITS, after, [1, 2, 4])
    # first hits: before at ranks 0, 1, 3, -, 0; after at ranks 0, 0, 1, 2, -
    # k=1: before hits queries 0, 4; after 0, 1: gained {1}, lost {4}
    assert out["1"] == {"before": 0.4, "after": 0.4, "gained": 1, "lost": 1, "p_value": 1.0}
    # k=2: before 0, 1, 4; after 0, 1, 2: gained {2}, lost {4}
    assert (out["2"]["gained"], out["2"]["lost"]) == (1, 1)
    # k=4: before 0, 1, 2, 4; after 0, 1, 2, 3: gained {3}, lost {4}
    assert (out["4"]["before"], out["4"]["after"]) == (0.8, 0.8)
    # one-sided: 10 gained, none lost -> 2 / 2**10; 3 gained, 1 lost -> 2 * 5 / 16
    many_before, many_after = np.zeros((12, 1), bool), np.zeros((12, 1), bool)
    many_after[:10] = True
    assert paired_recall(many_before, many_after, [1])["1"]["p_value"] == pytest.approx(2 / 1024,
                                                                              abs=1e-6)
    b, a = np.zeros((6, 1), bool), np.zeros((6, 1), bool)
    a[:3], b[3] = True, True
    assert paired_recall(b, a, [1])["1"]["p_value"] == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="queries"):
        paired_recall(HITS, after[:4], [1])
