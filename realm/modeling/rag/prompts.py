"""The RAG generator's inputs: a question beside each of its retrieved blocks as rows of LM tokens.

Each (question, block) pair is one row, and a gold answer its target::

    [BOS] "{title}\\n{body}" | "\\n\\nQuestion: {question}\\nAnswer:" | " {answer}\\n"
          └ block: cut from ┘                                        └ target: the newline
            the right to fit                                           is the stop
    [BOS] "Question: {question}\\nAnswer:" | " {answer}\\n"            (closed book: no block)

Each part is tokenized on its own with the LM's tokenizer (no special tokens; a BOS first where
the tokenizer adds one by convention) and the ids concatenated; titles, bodies, questions and
answers are stripped first, so that the parts join as the whole text would tokenize. Only the
block's text is cut to fit ``max_length`` (its end, the title and the start of the body kept);
a question that does not fit with its answer is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from realm.data.blocks import word_piece_encoder
from realm.data.mlm import pad_ragged

#: A retrieved block as ``(title, body)``; None: no block (the closed-book prompt).
Block = Optional[tuple[str, str]]
#: A question's gold answers: one string or several.
Answers = Union[str, Sequence[str]]


@dataclass
class GeneratorInputs:
    """Right-padded rows of ``B`` questions, each of its ``A`` gold answers beside each of its
    ``k`` blocks; only the real answers have rows (``N = answer_mask.sum() * k``).

    Attributes:
        input_ids: ``[N, L]`` int64, (question, answer)-major then block, padded with the pad id.
        attention_mask: ``[N, L]`` int64, 1 on real tokens.
        positions: ``[N, T]`` int64: the positions whose hidden states predict the answer's
            tokens (each answer token's position - 1); 0 on padding.
        targets: ``[N, T]`` int64, the answer's tokens (its newline last), 0 on padding.
        target_mask: ``[N, T]`` bool, True on the answer's tokens.
        answer_mask: ``[B, A]`` bool, True where the question has an ``a``-th answer.
        num_blocks: ``k``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    answer_mask: torch.Tensor
    num_blocks: int


class RAGPrompts:
    """Lays questions out beside their blocks as LM token rows (:mod:`realm.modeling.rag.prompts`).

    Args:
        tokenizer: The LM's (fast) tokenizer.
        max_length: The most LM tokens in a row (prompt and answer).
        name: The LM's name, for errors.
    """

    def __init__(self, tokenizer: Any, max_length: int = 512, name: Optional[str] = None):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.name = name or getattr(tokenizer, "name_or_path", "the LM")
        self.max_length = max_length
        self.encoder = word_piece_encoder(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos: list[int] = [int(bos)] if adds_bos else []

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """LM ids of each text, no special tokens."""
        return [e.ids for e in self.encoder.encode_batch(list(texts), add_special_tokens=False)]

    def answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """The target ids of each answer: ``" {answer}\\n"``.

        Raises:
            ValueError: An empty answer (the message names it).
        """
        for i, a in enumerate(answers):
            if not a.strip():
                raise ValueError(f"answer {i} ({a!r}) is empty")
        return self.encode([f" {a.strip()}\n" for a in answers])

    def prompt_ids(self, questions: Sequence[str], blocks: Sequence[Sequence[Block]],
                reserve: Sequence[int]) -> list[list[list[int]]]:
        """Each question's prompt beside each of its blocks, ``[B][k]`` lists of ids, each cut
        so that ``reserve[b]`` answer tokens fit after it within ``max_length``.

        Raises:
            ValueError: A question that is empty, or too long to fit with ``reserve[b]``
                answer tokens (the message names it), or a batch whose questions have
                different numbers of blocks.
        """
        if len(blocks) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(blocks)} lists of blocks")
        k = len(blocks[0]) if len(blocks) else 0
        if k == 0 or any(len(row) != k for row in blocks):
            raise ValueError(f"every question needs the same number (>= 1) of blocks (None "
                             f"for closed book); got {[len(row) for row in blocks]}")
        for i, q in enumerate(questions):
            if not q.strip():
                raise ValueError(f"question {i} ({q!r}) is empty")
        stripped = [q.strip() for q in questions]
        after_block = self.encode([f"\n\nQuestion: {q}\nAnswer:" for q in stripped])
        closed_book = self.encode([f"Question: {q}\nAnswer:" for q in stripped])
        headers = iter(self.encode([f"{z[0].strip()}\n{z[1].strip()}"
                                    for row in blocks for z in row if z is not None]))
        out = []
        for b, question in enumerate(stripped):
            fixed = len(self.bos) + len(after_block[b]) + reserve[b]
            budget = self.max_length - fixed
            if budget < 0:
                raise ValueError(
                    f"question {b} ({question[:80]!r}) takes {fixed} LM tokens with its answer; "
                    f"that is over the generator's limit of {self.max_length}")
            out.append([self.bos + closed_book[b] if z is None
                        else self.bos + next(headers)[:budget] + after_block[b]
                        for z in blocks[b]])
        return out

    def build(self, questions: Sequence[str], blocks: Sequence[Sequence[Block]],
              answers: Sequence[Answers]) -> GeneratorInputs:
        """The scoring rows of each question's answers beside its blocks (``blocks[b]``: ``k``
        pairs ``(title, body)``, None for the closed-book prompt).

        Raises:
            ValueError: As :meth:`prompt_ids`; a question without answers or an empty answer.
        """
        if len(answers) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
        golds = [[a] if isinstance(a, str) else list(a) for a in answers]
        for b, g in enumerate(golds):
            if not g:
                raise ValueError(f"question {b} ({questions[b][:80]!r}) has no answer")
        flat = self.answer_ids([a for g in golds for a in g])
        targets, start = [], 0
        for g in golds:
            targets.append(flat[start: start + len(g)])
            start += len(g)
        prompts = self.prompt_ids(questions, blocks, [max(len(t) for t in ts) for ts in targets])
        rows, positions, scored = [], [], []
        for b, ts in enumerate(targets):
            for target in ts:
                for prompt in prompts[b]:
                    rows.append(prompt + target)
                    positions.append(list(range(len(prompt) - 1, len(prompt) + len(target) - 1)))
                    scored.append(target)
        input_ids, attention_mask = pad_ragged(rows, self.pad_id)  # [N, L]
        position_ids, _ = pad_ragged(positions)  # [N, T]
        target_ids, target_mask = pad_ragged(scored)  # [N, T]
        num_answers = max(len(g) for g in golds)
        answer_mask = torch.tensor([[a < len(g) for a in range(num_answers)]
                                    for g in golds], dtype=torch.bool)  # [B, A]
        return GeneratorInputs(input_ids=input_ids, attention_mask=attention_mask.long(),
                               positions=position_ids, targets=target_ids,
                               target_mask=target_mask, answer_mask=answer_mask,
                               num_blocks=len(prompts[0]))
