"""REALM pretraining's per-step metrics from one forward's :class:`REALMOutput`: masked accuracy
(the marginal prediction's and the null document's alone), retrieval utility (expected, top-1, by
label), ``p(null)``, retrieval entropy and the null document's loss."""

from __future__ import annotations

import numpy as np
import torch

from realm.data.mlm import MLMBatch
from realm.losses import (expected_retrieval_utility, null_probability, retrieval_entropy,
                          retrieval_utility, top1_retrieval_utility)
from realm.modeling.realm import REALMOutput


def marginal_predictions(out: REALMOutput) -> torch.Tensor:
    """``argmax_y Σ_z p(z|x) p(y_j|z, x)`` at each masked position, ``[B, max_masked]`` (CPU):
    computed in the forward (:meth:`Reader.predict`)."""
    return out.predictions.cpu()


def _token_accuracy(predicted: torch.Tensor, batch: MLMBatch) -> float:
    """Share of the batch's masked targets that ``predicted`` ``[B, M]`` gets right."""
    hits = (predicted == batch.target_ids) & batch.target_mask
    return float(hits.sum() / batch.target_mask.sum().clamp(min=1))


def marginal_token_accuracy(out: REALMOutput, batch: MLMBatch) -> float:
    """Accuracy of :func:`marginal_predictions` on the masked tokens."""
    return _token_accuracy(marginal_predictions(out), batch)


def realm_metrics(out: REALMOutput, batch: MLMBatch) -> dict[str, float]:
    """Loss, masked accuracy, retrieval utility (expected, top-1, by label), p(null), entropy,
    and the loss and masked accuracy of the same reader beside the null document alone.

    With nothing retrieved (the null-only control, k = 0) only loss and accuracy are reported.
    """
    with torch.no_grad():
        metrics = {"loss": float(out.loss), "masked_accuracy": marginal_token_accuracy(out, batch),
                   "fallback_examples": float(batch.n_fallback)}
        if out.block_ids.shape[1] == 0:
            return metrics
        ru = retrieval_utility(out.log_p_y_given_z)  # [B, k]
        ru_exp = expected_retrieval_utility(ru, out.log_p_z)  # [B]
        metrics.update({
            # the same reader on the same examples beside the null document alone: what the
            # null-only control would score here (paired, so the gap is retrieval's alone)
            "loss_null": float(-out.log_p_y_given_z[:, -1].float().mean()),
            "masked_accuracy_null": _token_accuracy(out.null_predictions, batch),
            "ru_expected": float(ru_exp.mean()),
            "ru_top1": float(top1_retrieval_utility(ru, out.retrieval_logits).mean()),
            "p_null": float(null_probability(out.log_p_z).mean()),
            "retrieval_entropy": float(retrieval_entropy(out.log_p_z).mean()),
        })
        by_label: dict[str, list[float]] = {}
        for label, value in zip(batch.labels, ru_exp.tolist()):
            by_label.setdefault(label or "none", []).append(value)
        for label, values in by_label.items():
            metrics[f"ru_by_label/{label}"] = float(np.mean(values))
    return metrics
