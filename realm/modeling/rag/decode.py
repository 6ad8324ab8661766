"""RAG decoding: answers written by the generator over the top-k blocks (Lewis et al. 2020).

Every (question, block) prompt is prefilled once (:meth:`RAGGenerator.prefill`); then

- **RAG-Token** (``greedy``, ``beam``): one beam search per question whose next-token
  distribution at each step is the mixture ``Σ_z p(z|x) p(y_t | z, x, y_<t)`` of its ``k`` rows,
  each row one token further through its KV cache per step;
- **RAG-Sequence** (``thorough``, ``fast``): one beam search per (question, block) row; every
  distinct hypothesis ``y`` is then scored ``log Σ_z p(z|x) p(y|z, x)``. ``thorough`` scores a
  hypothesis under every block whose beam did not produce it, on copies of that block's prefill
  cache; ``fast`` counts ``p(y|z, x) = 0`` there.

An answer stops at a token that holds a newline, at EOS (never before it has written something
but whitespace: no empty answers), or after ``max_answer_tokens``::

    out = decode(generator, questions, blocks, retrieval_logits, method="thorough")
    out.answers[0], out.scores[0], out.posteriors[0]     # text, log p(y|x), p(z|x, y) [k]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from realm.modeling.modes import eval_mode
from realm.modeling.rag.generator import Prefill, RAGGenerator, select_cache
from realm.modeling.rag.prompts import Block

#: Decoding methods: RAG-Token ``greedy`` and ``beam``, RAG-Sequence ``thorough`` and ``fast``.
METHODS = ("greedy", "beam", "thorough", "fast")


@dataclass
class Hypothesis:
    """One candidate answer of a question.

    Attributes:
        ids: Its LM tokens, the stop token last where one ended it.
        text: Its text (up to the newline, stripped).
        score: ``log p(y|x)`` under the decoding's model (RAG-Token's or RAG-Sequence's).
        block_log_probs: ``[k]`` ``log p(y|z, x)`` under each block (``fast``: -inf where that
            block's beam did not find it).
        found: ``[k]`` bool: the blocks whose beam produced it (RAG-Token: all).
    """

    ids: tuple[int, ...]
    text: str
    score: float
    block_log_probs: torch.Tensor
    found: torch.Tensor


@dataclass
class Decoded:
    """The answers of ``B`` questions (tensors on the CPU).

    Attributes:
        answers: ``B`` answer strings (each question's best hypothesis).
        scores: ``[B]`` their ``log p(y|x)``.
        posteriors: ``[B, k]`` ``p(z|x, y)`` of each best answer over the blocks.
        hypotheses: Each question's hypotheses, best first.
    """

    answers: list[str]
    scores: torch.Tensor
    posteriors: torch.Tensor
    hypotheses: list[list[Hypothesis]]


@dataclass
class Beam:
    """A finished beam of :func:`beam_search`: its tokens, its score under the mixture, and
    ``[m]`` its log-probability under each row of its group."""

    ids: tuple[int, ...]
    score: float
    block_log_probs: torch.Tensor


def beam_search(generator: RAGGenerator, prefill: Prefill, log_weights: torch.Tensor,
                beam_size: int, max_tokens: int) -> list[list[Beam]]:
    """Beam search over ``G`` groups of ``m`` prefilled rows (group-major in ``prefill``), each
    step's distribution the mixture of a group's rows weighted by ``log_weights`` ``[G, m]``.

    Returns:
        Per group, its finished beams (best first, at most ``beam_size``); a beam that reached
        ``max_tokens`` without a stop counts as finished.
    """
    (groups, m), width = log_weights.shape, beam_size
    device = log_weights.device
    stop, blank = generator.stop_mask(), generator.blank_mask()  # [V] each
    rows = (torch.arange(groups, device=device)[:, None, None] * m
            + torch.arange(m, device=device)).expand(groups, width, m).reshape(-1)  # [G*W*m]
    cache = select_cache(prefill.cache, rows, generator.lm.config)
    mask = prefill.attention_mask[rows]  # [G*W*m, P]
    positions = prefill.lengths[rows]  # [G*W*m]
    log_probs = prefill.log_probs[rows].view(groups, width, m, -1)  # [G, W, m, V]
    vocab = log_probs.shape[-1]
    scores = torch.full((groups, width), float("-inf"), device=device)  # [G, W]
    scores[:, 0] = 0.0  # one live beam at first: its copies must not be chosen twice
    block_lp = torch.zeros(groups, width, m, device=device)  # [G, W, m]
    ids: list[list[tuple[int, ...]]] = [[()] * width for _ in range(groups)]
    finished: list[list[Beam]] = [[] for _ in range(groups)]
    done = [False] * groups
    empty = torch.ones(groups, width, dtype=torch.bool, device=device)  # [G, W]: blank so far
    arange_g = torch.arange(groups, device=device)
    for step in range(max_tokens):
        mixture = torch.logsumexp(log_weights[:, None, :, None] + log_probs, dim=2)  # [G, W, V]
        mixture = mixture.masked_fill(empty[:, :, None] & stop, float("-inf"))  # no empty answer
        top, index = (scores[:, :, None] + mixture).view(groups, -1).topk(
            min(2 * width, width * vocab), dim=1)  # [G, 2W]
        source, token = index // vocab, index % vocab  # [G, 2W]
        candidate_lp = (block_lp[arange_g[:, None], source]
                        + log_probs[arange_g[:, None], source, :, token])  # [G, 2W, m]
        candidate_cpu = candidate_lp.cpu()
        is_stop = stop[token].tolist()
        top_l, source_l, token_l = top.tolist(), source.tolist(), token.tolist()
        picked = [[0] * width for _ in range(groups)]  # the candidates that stay alive
        new_scores = [[float("-inf")] * width for _ in range(groups)]
        new_ids: list[list[tuple[int, ...]]] = [[()] * width for _ in range(groups)]
        for g in range(groups):
            if done[g]:
                continue
            alive = 0
            for r in range(len(token_l[g])):
                beam = ids[g][source_l[g][r]] + (token_l[g][r],)
                if is_stop[g][r]:
                    if r < width:  # a stop among the best W candidates ends a hypothesis
                        finished[g].append(Beam(beam, top_l[g][r], candidate_cpu[g, r]))
                    continue
                picked[g][alive], new_scores[g][alive], new_ids[g][alive] = r, top_l[g][r], beam
                alive += 1
                if alive == width:
                    break
            finished[g] = sorted(finished[g], key=lambda h: -h.score)[:width]
            done[g] = alive == 0 or (len(finished[g]) == width
                                     and max(new_scores[g]) <= finished[g][-1].score)
        chosen = torch.tensor(picked, device=device)  # [G, W]
        new_source, new_token = source.gather(1, chosen), token.gather(1, chosen)  # [G, W]
        scores = torch.tensor(new_scores, device=device)  # [G, W]
        block_lp, ids = candidate_lp[arange_g[:, None], chosen], new_ids  # [G, W, m]
        empty = empty.gather(1, new_source) & blank[new_token]  # [G, W]
        if all(done) or step == max_tokens - 1:
            break
        order = ((arange_g[:, None] * width + new_source)[:, :, None] * m
                 + torch.arange(m, device=device)).view(-1)  # [G*W*m]
        if not bool((new_source == torch.arange(width, device=device)).all()):
            # a beam moved: its rows' caches follow it (greedy never moves, and copying every
            # layer's keys and values each step would cost more than the step itself)
            cache.reorder_cache(order)
            mask, positions = mask[order], positions[order]
        mask = torch.cat([mask, mask.new_ones(len(order), 1)], dim=1)  # [G*W*m, P + t]
        tokens = new_token[:, :, None].expand(groups, width, m).reshape(-1, 1)  # [G*W*m, 1]
        states = generator.extend(cache, mask, tokens, positions[:, None])  # [G*W*m, 1, H]
        positions = positions + 1
        log_probs = generator.head_log_probs(states[:, -1]).view(groups, width, m, vocab)
    for g in range(groups):  # what ran out of tokens without a stop
        if not done[g]:
            finished[g] += [Beam(ids[g][w], float(scores[g, w]), block_lp[g, w].cpu())
                            for w in range(width) if scores[g, w] > float("-inf")]
            finished[g] = sorted(finished[g], key=lambda h: -h.score)[:width]
    return finished


def _prefill(generator: RAGGenerator, questions: Sequence[str],
             blocks: Sequence[Sequence[Block]], retrieval_logits: torch.Tensor,
             max_answer_tokens: int) -> tuple[Prefill, torch.Tensor]:
    """The ``B * k`` prompts' prefill (question-major) and ``log p(z|x)`` ``[B, k]``."""
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be positive, got {max_answer_tokens}")
    prompts = generator.prompts.prompt_ids(questions, blocks, [max_answer_tokens] * len(questions))
    if tuple(retrieval_logits.shape) != (len(prompts), len(prompts[0])):
        raise ValueError(f"retrieval_logits {tuple(retrieval_logits.shape)} do not match "
                         f"{len(prompts)} questions x {len(prompts[0])} blocks")
    prefill = generator.prefill([p for row in prompts for p in row])
    return prefill, torch.log_softmax(retrieval_logits.float().to(generator.device), dim=-1)


def _decoded(generator: RAGGenerator, hypotheses: list[list[Hypothesis]],
             log_p_z: torch.Tensor) -> Decoded:
    """The best hypothesis of each question, its score and ``p(z|x, y)``."""
    best = [h[0] for h in hypotheses]
    log_p_z = log_p_z.cpu()
    posteriors = torch.stack([torch.softmax(log_p_z[b] + h.block_log_probs, dim=-1)
                              for b, h in enumerate(best)])  # [B, k]
    return Decoded(answers=[h.text for h in best],
                   scores=torch.tensor([h.score for h in best]), posteriors=posteriors,
                   hypotheses=hypotheses)


@torch.no_grad()
def rag_token_decode(generator: RAGGenerator, questions: Sequence[str],
                     blocks: Sequence[Sequence[Block]], retrieval_logits: torch.Tensor,
                     beam_size: int = 1, max_answer_tokens: int = 16) -> Decoded:
    """RAG-Token decoding: greedy (``beam_size`` 1) or beam search over the per-step mixture
    of each question's ``k`` rows.

    Args:
        generator: The generator.
        questions: ``B`` questions.
        blocks: ``B`` lists of ``k`` ``(title, body)`` pairs (None: the closed-book prompt).
        retrieval_logits: ``[B, k]`` the retriever's scores of the blocks.
        beam_size: Beams per question.
        max_answer_tokens: The most tokens in an answer (its stop included).
    """
    with eval_mode(generator):
        prefill, log_p_z = _prefill(generator, questions, blocks, retrieval_logits,
                                    max_answer_tokens)
        beams = beam_search(generator, prefill, log_p_z, beam_size, max_answer_tokens)
    everywhere = torch.ones(log_p_z.shape[1], dtype=torch.bool)
    hypotheses = [[Hypothesis(ids=h.ids, text=generator.answer_text(h.ids), score=h.score,
                              block_log_probs=h.block_log_probs, found=everywhere)
                   for h in group] for group in beams]
    return _decoded(generator, hypotheses, log_p_z)


@torch.no_grad()
def rag_sequence_decode(generator: RAGGenerator, questions: Sequence[str],
                        blocks: Sequence[Sequence[Block]], retrieval_logits: torch.Tensor,
                        beam_size: int = 4, thorough: bool = True,
                        max_answer_tokens: int = 16) -> Decoded:
    """RAG-Sequence decoding: a beam search per (question, block), then each question's
    distinct hypotheses marginalised over its blocks (arguments as :func:`rag_token_decode`).

    Args:
        thorough: Score every hypothesis under every block (``thorough``), on copies of the
            block's prefill cache; else a block counts 0 for what its beam did not find
            (``fast``).
    """
    with eval_mode(generator):
        prefill, log_p_z = _prefill(generator, questions, blocks, retrieval_logits,
                                    max_answer_tokens)
        num_q, k = log_p_z.shape
        beams = beam_search(generator, prefill, log_p_z.new_zeros(num_q * k, 1), beam_size,
                            max_answer_tokens)  # per row b * k + z
        table: list[dict[tuple[int, ...], torch.Tensor]] = []  # per question: ids -> [k]
        for b in range(num_q):
            found: dict[tuple[int, ...], torch.Tensor] = {}
            for z in range(k):
                for h in beams[b * k + z]:
                    found.setdefault(h.ids, torch.full((k,), float("-inf"),
                                                       device=log_p_z.device))[z] = h.score
            table.append(found)
        missing = [(b, ids, z) for b, found in enumerate(table) for ids, lp in found.items()
                   for z in range(k) if thorough and lp[z] == float("-inf")]
        if missing:
            rows = torch.tensor([b * k + z for b, _, z in missing], device=log_p_z.device)
            rescored = generator.continuation_log_probs(
                prefill, rows, [ids for _, ids, _ in missing]).sum(-1)  # [n_missing]
            for (b, ids, z), value in zip(missing, rescored):
                table[b][ids][z] = value
    hypotheses = []
    for b, found in enumerate(table):
        hyps = [Hypothesis(ids=ids, text=generator.answer_text(ids),
                           score=float(torch.logsumexp(log_p_z[b] + lp, dim=0)),
                           block_log_probs=lp.cpu(),
                           found=torch.tensor([any(h.ids == ids for h in beams[b * k + z])
                                               for z in range(k)]))
                for ids, lp in found.items()]
        hypotheses.append(sorted(hyps, key=lambda h: -h.score))
    return _decoded(generator, hypotheses, log_p_z)


def decode(generator: RAGGenerator, questions: Sequence[str], blocks: Sequence[Sequence[Block]],
           retrieval_logits: torch.Tensor, method: str = "thorough", beam_size: int = 4,
           max_answer_tokens: int = 16) -> Decoded:
    """Answers by one of :data:`METHODS` (``greedy`` ignores ``beam_size``)."""
    if method not in METHODS:
        raise ValueError(f"decoding method must be one of {METHODS}, got {method!r}")
    if method in ("greedy", "beam"):
        return rag_token_decode(generator, questions, blocks, retrieval_logits,
                                1 if method == "greedy" else beam_size, max_answer_tokens)
    return rag_sequence_decode(generator, questions, blocks, retrieval_logits, beam_size,
                               method == "thorough", max_answer_tokens)
