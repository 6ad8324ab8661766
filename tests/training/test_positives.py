"""The Open-QA reader's warm-up data (DPR): positive blocks, negatives and answer windows."""

import numpy as np
import torch

from realm.data.qa import QAExample, QADataset, collate_qa, read_qa
from realm.data.store import BlockStore
from realm.modeling.openqa import OpenQAModel
from realm.modeling.span_reader import SpanReader
from realm.retrieval.fixed import BM25Index
from realm.training.positives import find_positives, positive_windows


def test_positive_blocks_hold_the_answer_and_negatives_do_not(squad_tiny, tiny_encoder):
    """The reader's warm-up data (DPR): the best-ranked block with an answer, windows around it."""
    store = BlockStore(str(squad_tiny / "corpus"))
    torch.manual_seed(0)
    reader = SpanReader.from_checkpoint(tiny_encoder, max_span_tokens=6, span_hidden=8)
    model = OpenQAModel(None, reader, BM25Index(store), store, reader.tokenizer, k=3,
                        max_joined_tokens=200)
    qa = read_qa(str(squad_tiny / "qa.jsonl"))
    qa.append(QAExample("Who painted the Mona Lisa?", ["Leonardo da Vinci"]))  # not in the slice
    dataset = QADataset(qa, reader.tokenizer, 48)
    found = find_positives(model, dataset, search_k=10, negatives=2, progress=False)
    assert found.positive[-1] == -1 and (found.positive[:-1] >= 0).all()
    for i, ex in enumerate(qa[:-1]):
        pos = int(found.positive[i])
        assert any(a.lower() in f"{store.title(pos)} {store.text(pos)}".lower()
                   for a in ex.answers)
        for neg in found.negatives[i]:
            if neg >= 0:
                text = f"{store.title(int(neg))} {store.text(int(neg))}".lower()
                assert not any(a.lower() in text for a in ex.answers), (ex.answers, neg)
        # the positive is the best-ranked block with an answer
        _, ids = model.index.search([ex.question], 10)
        assert pos == next(int(b) for b in ids[0]
                           if any(a.lower() in f"{store.title(int(b))} {store.text(int(b))}".lower()
                                  for a in ex.answers))
    keep = np.flatnonzero(found.positive >= 0)
    sub = found.subset(keep)
    assert len(sub.positive) == len(qa) - 1 and (sub.positive >= 0).all()
    # windows: 24 body word pieces; the positive's holds its answer, all stay inside the body
    rng = np.random.default_rng(0)
    blocks, windows = positive_windows(sub, list(range(len(keep))), store, 24, rng)
    assert blocks.shape == (len(keep), 3) and windows.shape == (len(keep), 3, 2)
    assert (blocks[:, 0] == sub.positive).all()
    for i in range(len(keep)):
        for j in range(3):
            start, length = windows[i, j]
            assert 0 <= start and start + length <= len(store.body_ids(int(blocks[i, j])))
        if sub.answer_start[i] >= 0:
            start, length = windows[i, 0]
            a0, a_len = sub.answer_start[i], sub.answer_length[i]
            assert start <= a0 and a0 + a_len <= start + length
    # read through those windows: the answer is found in the positive, the loss is finite
    batch = collate_qa([QADataset([qa[i] for i in keep], reader.tokenizer, 48)[i]
                        for i in range(4)])
    out = model(batch, blocks[:4], torch.zeros(4, 3), windows=windows[:4])
    assert out.span_logits.shape[1] == 3 and out.span_logits.shape[2] <= 48 + 24 + 20
    assert out.answer_mask[:, 0].flatten(1).any(dim=1).all() and torch.isfinite(out.loss)
    assert not out.answer_mask[:, 1:].any()
    # a prediction cut from a window maps back to the block's text
    for pred, row in zip(model.best_spans(out), blocks[:4]):
        assert pred["prediction"] in store.text(pred["block"]) + store.title(pred["block"])
