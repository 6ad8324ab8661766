"""The RAG generator: a causal LM that reads a question beside each retrieved block.

Any transformers causal LM (:func:`realm.modeling.lm.load_causal_lm`; ``smollm2``: the offline
SmolLM2-135M-Instruct) scores gold answers after ``title\\nbody\\n\\nQuestion: q\\nAnswer:``
(:mod:`realm.modeling.rag.prompts`) and decodes new ones (:mod:`realm.modeling.rag.decode`).
The retriever's logits come from outside; the generator returns token log-probabilities, which
the losses (:mod:`realm.modeling.rag.losses`) marginalise::

    generator = RAGGenerator.from_checkpoint("smollm2", mode="full")
    scores = generator.score(questions, blocks, answers)   # token_log_probs [B, A, k, T]
    loss = rag_sequence_loss(retrieval_logits, scores.token_log_probs, scores.answer_mask)

Scoring is one forward over the ``B * A * k`` right-padded rows, the vocabulary logits computed
only at the positions that predict answer tokens. Decoding runs one left-padded prefill per
(question, block) row, then one token per step through the KV cache (:meth:`prefill`,
:meth:`extend`). Modes: ``frozen`` (no gradient, eval mode, bf16 autocast where the device runs
it fast), ``lora`` (the causal-LM reader's adapter on the attention projections trains) and
``full`` (every weight trains).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from realm.artifacts import atomic_directory, read_manifest, write_manifest
from realm.data.mlm import pad_ragged
from realm.hub import load_tokenizer
from realm.precision import autocast, autocast_dtype
from realm.modeling.lm import FrozenBf16, head_logits, load_causal_lm, rebuilt_parameters
from realm.modeling.rag.prompts import Answers, Block, GeneratorInputs, RAGPrompts
from realm.modeling.readers.lora import (ADAPTER_DIR, LoraSettings, adapter_base, add_adapter,
                                         is_adapted, load_adapter, merged_copy, settings_of)

logger = logging.getLogger(__name__)

MODES = ("frozen", "lora", "full")
#: The manifest kind of a saved generator (:meth:`RAGGenerator.save_pretrained`).
MANIFEST_KIND = "rag_generator"
FORMAT_VERSION = 1


@dataclass
class GeneratorScores:
    """The generator's scores of ``B`` questions' ``A`` gold answers beside ``k`` blocks.

    Attributes:
        token_log_probs: ``[B, A, k, T]`` float32 ``log p(a_t | z, x, a_<t)``, 0 on padding
            (of the tokens and of the missing answers).
        target_mask: ``[B, A, T]`` bool, True on the answers' tokens.
        answer_mask: ``[B, A]`` bool, True on the real answers.
    """

    token_log_probs: torch.Tensor
    target_mask: torch.Tensor
    answer_mask: torch.Tensor

    @property
    def sequence_log_probs(self) -> torch.Tensor:
        """``log p(a | z, x)`` ``[B, A, k]``."""
        return self.token_log_probs.sum(-1)


@dataclass
class Prefill:
    """The KV cache of left-padded prompt rows, and what comes next after each.

    Attributes:
        cache: The transformers cache of the ``N`` rows (never changed by decoding: beams and
            re-scoring work on copies, :func:`select_cache`).
        attention_mask: ``[N, P]`` int64, 1 on the prompts' tokens (right-aligned).
        lengths: ``[N]`` int64, each prompt's length (the position of its next token).
        log_probs: ``[N, vocab]`` float32, the next-token log-probabilities after each prompt.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor


def select_cache(cache: DynamicCache, index: torch.Tensor, config: Any = None) -> DynamicCache:
    """A new cache holding the rows ``index`` ``[n]`` of ``cache`` (rows may repeat)."""
    return DynamicCache([(layer.keys[index], layer.values[index]) for layer in cache.layers],
                        config=config)


class RAGGenerator(nn.Module):
    """A transformers causal LM that scores and writes answers after each retrieved block.

    Args:
        lm: Any ``AutoModelForCausalLM`` model (a base model under a separable LM head).
        tokenizer: Its fast tokenizer.
        mode: ``frozen`` (no gradient, eval mode, bf16 where fast), ``lora`` (a LoRA adapter
            trains, :mod:`realm.modeling.readers.lora`) or ``full`` (every weight trains).
        max_length: The most LM tokens in a row (prompt and answer); only blocks are cut.
        precision: ``frozen`` mode's autocast: ``auto`` (bf16 where the device runs it fast),
            ``bf16`` or ``fp32``.
        base_checkpoint: The name the LM came from.
        lora: ``lora`` mode's adapter (default :class:`LoraSettings`'s); an ``lm`` that
            already carries one (a peft model) keeps it.
    """

    def __init__(self, lm: PreTrainedModel, tokenizer: Any, *, mode: str = "frozen",
                 max_length: int = 512, precision: str = "auto",
                 base_checkpoint: Optional[str] = None, lora: Optional[LoraSettings] = None):
        super().__init__()
        self.name = base_checkpoint or getattr(tokenizer, "name_or_path", type(lm).__name__)
        if mode not in MODES:
            raise ValueError(f"generator mode must be one of {MODES}, got {mode!r}")
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{self.name}: no LM head to score with")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{self.name}: its tokenizer has no end-of-sequence token")
        self.lora: Optional[LoraSettings] = None  # lora mode's adapter
        if mode == "lora":
            if not is_adapted(lm):
                lm = add_adapter(lm, lora or LoraSettings(), self.name)
            elif lora is not None and settings_of(lm) != lora:
                raise ValueError(f"{self.name}: the model's LoRA adapter is {settings_of(lm)}, "
                                 f"not {lora}")
            self.lora = settings_of(lm)
        elif is_adapted(lm):
            raise ValueError(f"{self.name}: a model with an adapter generates in mode 'lora', "
                             f"not {mode!r}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.mode, self.precision, self.base_checkpoint = mode, precision, base_checkpoint
        self.prompts = RAGPrompts(tokenizer, max_length, name=self.name)
        self.stop_ids: Optional[torch.Tensor] = None  # [vocab] bool (CPU), built on first use
        self.blank_ids: Optional[torch.Tensor] = None  # [vocab] bool (CPU), likewise
        self.texts: Optional[list[str]] = None  # each id's text, likewise
        self.held = FrozenBf16(self.lm)  # (a frozen LM under bf16 autocast: bf16_copies)
        if mode == "frozen":
            self.lm.requires_grad_(False)
            self.lm.eval()

    @classmethod
    def from_checkpoint(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "RAGGenerator":
        """A generator over a transformers causal LM: a directory, a hub name, or a packaged
        alias (``smollm2``); ``kwargs`` go to the constructor.

        Raises:
            ConfigError: As :func:`realm.modeling.lm.load_causal_lm`.
        """
        lm, tokenizer = load_causal_lm(name_or_path, dtype)
        return cls(lm, tokenizer, base_checkpoint=name_or_path, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def rebuilt_parameters(self) -> list[torch.nn.Parameter]:
        """The LM's weights a training checkpoint leaves out (the frozen ones, rebuilt from
        ``base_checkpoint`` on resume: :func:`realm.modeling.lm.rebuilt_parameters`)."""
        return rebuilt_parameters(self.lm, self.mode)

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        metadata: Optional[dict[str, Any]] = None,
                        overwrite: bool = False) -> Path:
        """Write the LM as a transformers causal-LM directory (weights, config, tokenizer:
        ``AutoModelForCausalLM.from_pretrained(dir)`` opens it) with a ``rag_generator``
        manifest and model card, atomically.

        In ``lora`` mode the weights are the merged ``W + (alpha / rank) B A`` (merged in a copy)
        and peft's adapter directory goes in ``adapter/``
        (``PeftModel.from_pretrained(base, dir / "adapter")`` opens it), as the causal-LM reader
        saves them."""
        target = Path(save_directory)
        base = self.lm.get_base_model() if is_adapted(self.lm) else self.lm
        with atomic_directory(target, overwrite=overwrite) as tmp:
            (merged_copy(self.lm) if self.lora is not None else self.lm).save_pretrained(tmp)
            self.tokenizer.save_pretrained(str(tmp))
            fields = {"base_checkpoint": self.base_checkpoint,
                      "model_type": getattr(self.lm.config, "model_type", None),
                      "architecture": type(base).__name__,
                      "hidden_size": self.lm.config.hidden_size,
                      "vocab_size": self.lm.config.vocab_size,
                      "mode": self.mode, "max_length": self.prompts.max_length,
                      "model": ".", "tokenizer": "."}
            if self.lora is not None:
                self.lm.save_pretrained(str(tmp / ADAPTER_DIR))
                fields.update(lora=self.lora.to_dict(), adapter=ADAPTER_DIR)
            write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved the RAG generator to %s", target)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "RAGGenerator":
        """Load a directory written by :meth:`save_pretrained`; ``kwargs`` (``mode``,
        ``max_length``, ``precision``) override what it recorded.

        A ``lora`` directory loads its merged weights ``frozen`` (for inference) unless ``mode``
        says otherwise; ``mode="lora"`` puts its saved adapter back on the recorded
        ``base_checkpoint`` to continue training it.

        Raises:
            ValueError: ``directory`` is not a saved generator (the message names its kind).
            ConfigError: ``mode="lora"`` where the adapter's base checkpoint does not resolve.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        adapter = manifest.get("adapter")
        options: dict[str, Any] = {
            "mode": "frozen" if adapter else manifest.get("mode", "frozen"),
            "max_length": manifest.get("max_length", 512),
            "base_checkpoint": manifest.get("base_checkpoint")}
        options.update(kwargs)
        if adapter and options["mode"] == "lora":  # the same adapter, on its base, trainable
            lm = load_adapter(adapter_base(directory, manifest, dtype), directory / adapter)
        else:
            lm = AutoModelForCausalLM.from_pretrained(directory / manifest["model"], dtype=dtype)
        generator = cls(lm, load_tokenizer(str(directory / manifest["tokenizer"])), **options)
        logger.info("loaded the RAG generator from %s (%s)", directory, generator.mode)
        return generator

    def train(self, mode: bool = True) -> "RAGGenerator":
        """As nn.Module's; a frozen generator stays in eval mode."""
        super().train(mode)
        if self.mode == "frozen":
            self.lm.eval()
        return self

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """No gradient for a frozen LM; a frozen LM's bf16 autocast where the device runs it."""
        frozen = self.mode == "frozen"
        bf16 = frozen and autocast_dtype(self.precision, self.device) == "bf16"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen), \
                autocast(bf16, self.device):
            yield

    def bf16_copies(self) -> Optional[FrozenBf16]:
        """Inside :meth:`forward_context`: the frozen LM's bf16 weight copies where it runs
        under bf16 autocast (made once, not cast anew by every forward: decoding runs many),
        else None."""
        kind = self.device.type
        return (self.held if self.mode == "frozen" and self.held.under_bf16_autocast(kind)
                else None)

    def run_decoder(self, **kwargs: Any) -> Any:
        """The base model's forward (over :meth:`bf16_copies` where there are some)."""
        held, decoder = self.bf16_copies(), self.lm.get_decoder()
        return decoder(**kwargs) if held is None else held.call(decoder, **kwargs)

    def vocab_logits(self, states: torch.Tensor) -> torch.Tensor:
        """:func:`realm.modeling.lm.head_logits` inside :meth:`forward_context`."""
        held = self.bf16_copies()
        return head_logits(self.lm, states, held.head_weight() if held else None)

    # -- scoring gold answers (training) --------------------------------------------------

    def build_inputs(self, questions: Sequence[str], blocks: Sequence[Sequence[Block]],
                     answers: Sequence[Answers]) -> GeneratorInputs:
        """The scoring rows (:meth:`realm.modeling.rag.prompts.RAGPrompts.build`): CPU only,
        no weights read, so a prefetch thread can build them."""
        return self.prompts.build(questions, blocks, answers)

    def score(self, questions: Sequence[str], blocks: Sequence[Sequence[Block]],
              answers: Sequence[Answers]) -> GeneratorScores:
        """Every gold answer's token log-probabilities beside every block, in one forward.

        Args:
            questions: ``B`` questions.
            blocks: ``B`` lists of ``k`` ``(title, body)`` pairs (None: the closed-book prompt).
            answers: ``B`` gold answers, each a string or a list of strings.

        Raises:
            ValueError: An empty or too long question, an empty answer (the message names it).
        """
        return self.score_inputs(self.build_inputs(questions, blocks, answers))

    def score_inputs(self, inputs: GeneratorInputs) -> GeneratorScores:
        """:meth:`score` of rows already built."""
        device = self.device
        with self.forward_context():
            states = self.run_decoder(
                input_ids=inputs.input_ids.to(device),
                attention_mask=inputs.attention_mask.to(device),
                use_cache=False).last_hidden_state  # [N, L, hidden]
            positions = inputs.positions.to(device)  # [N, T]
            index = positions[:, :, None].expand(-1, -1, states.shape[-1])  # [N, T, hidden]
            logits = self.vocab_logits(states.gather(1, index)).float()  # [N, T, vocab]
        targets = inputs.targets.to(device)  # [N, T]
        mask = inputs.target_mask.to(device)  # [N, T]
        token_log_probs = (logits.gather(-1, targets[..., None]).squeeze(-1)
                           - torch.logsumexp(logits, dim=-1)).masked_fill(~mask, 0.0)  # [N, T]
        answer_mask = inputs.answer_mask.to(device)  # [B, A]
        (b, a), k, t = answer_mask.shape, inputs.num_blocks, targets.shape[1]
        out = token_log_probs.new_zeros(b * a, k, t)  # [B * A, k, T]
        out[answer_mask.flatten()] = token_log_probs.view(-1, k, t)
        target_mask = mask.new_zeros(b * a, t)  # [B * A, T]
        target_mask[answer_mask.flatten()] = mask[::k]
        return GeneratorScores(token_log_probs=out.view(b, a, k, t),
                               target_mask=target_mask.view(b, a, t), answer_mask=answer_mask)

    # -- decoding pieces (realm.modeling.rag.decode) --------------------------------------

    def head_log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities ``[..., vocab]`` (float32) of hidden states
        ``[..., hidden]``."""
        with self.forward_context():
            logits = self.vocab_logits(states)  # [..., vocab]
        return torch.log_softmax(logits.float(), dim=-1)

    def extend(self, cache: DynamicCache, attention_mask: torch.Tensor, input_ids: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` ``[N, t]`` at ``position_ids`` ``[N, t]`` after the rows of
        ``cache`` (which grows in place); ``attention_mask`` ``[N, past + t]``. Returns the
        hidden states ``[N, t, hidden]``."""
        decoder = self.lm.get_decoder()
        # transformers >= 5.2x names it ``cache`` (``past_key_values`` before)
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters \
            else "past_key_values"
        with self.forward_context():
            return self.run_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=True,
                                    **{name: cache}).last_hidden_state

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        """One forward over the prompts, left-padded, keeping their KV cache."""
        device = self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.prompts.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [N, P]
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [N, P]
        cache = DynamicCache(config=self.lm.config)
        states = self.extend(cache, attention_mask, input_ids, position_ids)  # [N, P, hidden]
        return Prefill(cache=cache, attention_mask=attention_mask,
                       lengths=attention_mask.sum(1), log_probs=self.head_log_probs(states[:, -1]))

    def continuation_log_probs(self, prefill: Prefill, rows: torch.Tensor,
                               continuations: Sequence[Sequence[int]],
                               batch_rows: int = 64) -> torch.Tensor:
        """Token log-probabilities ``[N, T]`` (0 on padding) of each continuation after its
        prefilled row ``rows`` ``[N]``, on copies of those rows' cache, ``batch_rows`` at a
        time."""
        out = []
        for start in range(0, len(rows), batch_rows):
            index = rows[start: start + batch_rows].to(prefill.attention_mask.device)  # [n]
            ids, mask = pad_ragged(continuations[start: start + batch_rows],
                                   self.prompts.pad_id)  # [n, T]
            ids, mask = ids.to(index.device), mask.to(index.device)
            attention_mask = torch.cat([prefill.attention_mask[index], mask.long()], dim=1)
            position_ids = prefill.lengths[index, None] + torch.arange(
                ids.shape[1], device=index.device)  # [n, T]
            cache = select_cache(prefill.cache, index, self.lm.config)
            states = self.extend(cache, attention_mask, ids, position_ids)  # [n, T, hidden]
            first = prefill.log_probs[index].gather(1, ids[:, :1])  # [n, 1]
            rest = self.head_log_probs(states[:, :-1]).gather(
                -1, ids[:, 1:, None]).squeeze(-1)  # [n, T - 1]
            out.append(torch.cat([first, rest], dim=1).masked_fill(~mask, 0.0))
        width = max(o.shape[1] for o in out)
        return torch.cat([nn.functional.pad(o, (0, width - o.shape[1])) for o in out])

    def token_texts(self) -> list[str]:
        """Each vocabulary id's text (the tokenizer's ids; decoded once)."""
        if self.texts is None:
            self.texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return self.texts

    def stop_mask(self) -> torch.Tensor:
        """``[vocab]`` bool: the tokens that end an answer (any holding a newline, and EOS)."""
        if self.stop_ids is None:
            vocab = self.lm.get_output_embeddings().weight.shape[0]
            stop = torch.zeros(vocab, dtype=torch.bool)
            stop[[i for i, text in enumerate(self.token_texts()[:vocab]) if "\n" in text]] = True
            stop[int(self.tokenizer.eos_token_id)] = True
            self.stop_ids = stop
        return self.stop_ids.to(self.device)

    def blank_mask(self) -> torch.Tensor:
        """``[vocab]`` bool: the tokens that write nothing but whitespace (or nothing): an
        answer of only these may not stop yet."""
        if self.blank_ids is None:
            vocab = self.lm.get_output_embeddings().weight.shape[0]
            blank = torch.ones(vocab, dtype=torch.bool)
            blank[[i for i, text in enumerate(self.token_texts()[:vocab]) if text.strip()]] = False
            self.blank_ids = blank
        return self.blank_ids.to(self.device)

    def answer_text(self, ids: Sequence[int]) -> str:
        """An answer's text: its tokens up to the first newline, stripped."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text.split("\n", 1)[0].strip()
