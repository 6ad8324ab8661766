"""recall@k and hit matrices on hand-made inputs."""

import numpy as np
import pytest

from realm.evaluation import answer_hits, gold_hits, recall_at_k

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
