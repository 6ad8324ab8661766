"""The causal-LM reader: REALM's ``p(y|z, x)`` read by a pretrained language model.

Any transformers causal LM (``AutoModelForCausalLM``; ``smollm2``: the offline
SmolLM2-135M-Instruct, :data:`realm.hub.PACKAGED_GGUF`) scores a masked example's span, in its
own tokens, after each candidate block's cased text and the sentence up to the span
(:mod:`realm.modeling.readers.lm_inputs`: the mapping through character offsets, the layouts
and the null template)::

    reader = CausalLMReader.from_checkpoint("smollm2", store=store, examples_store=store)
    inputs = reader.build_inputs(batch, titles, bodies, special, 352, block_ids=ids)  # [B, k]
    out = reader.read(inputs, batch)          # out.log_p_y_given_z [B, k + 1], null last
    exact, exact_null = reader.predict(out, log_p_z)   # target_ids where the span is exact
    reader.save_pretrained("run/encoder")     # a transformers causal-LM directory + manifest

One forward over the ``B * (k + 1)`` right-padded rows; the vocabulary logits are computed only
at the positions that predict the scored tokens (the base model's hidden states there, then the
LM head) and log-softmaxed in fp32. Modes:

- ``frozen`` (the default): no gradient, eval mode, bf16 autocast where the device runs it fast;
  REALM's gradient then reaches the retriever alone.
- ``lora``: a LoRA adapter (peft; :mod:`realm.modeling.readers.lora`) on the attention
  projections trains, the base weights stay frozen; precision as ``full``. A new adapter scores
  exactly as the base does. Saved, the directory holds the merged weights (a plain causal-LM
  directory) and the adapter in ``adapter/``.
- ``full``: every weight trains.

Where the reader trains, what the retriever learns from is REALM's choice, not the reader's
(:class:`realm.modeling.realm.REALM`, ``pretrain.retriever_signal``): ``marginal`` is REALM's
joint gradient of the marginal loss through ``log p(y|z, x)``; every other signal
(``relative``, ``positive``, ``pdist``) detaches ``log p(y|z, x)`` in the retriever's target
(EMDR2-style), so the reader's gradient and the retriever's are separate.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from realm.artifacts import atomic_directory, read_manifest, write_manifest
from realm.data.blocks import word_piece_encoder
from realm.data.mlm import MLMBatch
from realm.data.store import BlockStore
from realm.hub import load_tokenizer
from realm.precision import autocast, autocast_dtype
from realm.modeling.lm import FrozenBf16, head_logits, load_causal_lm, rebuilt_parameters
from realm.modeling.readers.base import Reader, ReaderOutput
from realm.modeling.readers.lm_inputs import (NULL_BODY, NULL_TITLE, LMInputs, PromptBuilder,
                                              span_texts)
from realm.modeling.readers.lora import (ADAPTER_DIR, LoraSettings, adapter_base, add_adapter,
                                         is_adapted, load_adapter, merged_copy, settings_of)

logger = logging.getLogger(__name__)

MANIFEST_KIND = "causal_lm_reader"
FORMAT_VERSION = 1
MODES = ("frozen", "lora", "full")


@dataclass
class CausalLMDetails:
    """What :meth:`CausalLMReader.read` keeps for :meth:`CausalLMReader.predict`.

    Attributes:
        greedy: The LM's argmax at each scored position, ``[B, C, M]`` (LM ids).
        targets: The scored LM tokens, ``[B, M]``; ``span_mask``: True on the span's tokens.
        target_ids: The examples' word-piece targets, ``[B, M_wp]`` (what a hit returns).
    """

    greedy: torch.Tensor
    targets: torch.Tensor
    span_mask: torch.Tensor
    target_ids: torch.Tensor


class CausalLMReader(Reader):
    """A transformers causal LM that scores each masked span after each candidate block.

    Args:
        lm: Any ``AutoModelForCausalLM`` model (a base model under a separable LM head).
        lm_tokenizer: Its fast tokenizer (with offsets and an end-of-sequence token).
        store: The knowledge store the candidates come from (their title and cased text).
        examples_store: The store the masked examples come from; default ``store``.
        corpus_tokenizer: The tokenizer ``examples_store`` was cut with; default the one its
            manifest names (loaded on first use).
        layout: ``prefix`` or ``blank`` (:data:`realm.modeling.readers.lm_inputs.LAYOUTS`).
        mode: ``frozen`` (no gradient, eval mode, bf16 where fast), ``lora`` (a LoRA adapter
            trains, the base stays frozen) or ``full`` (every weight trains).
        precision: ``frozen`` mode's autocast: ``auto`` (bf16 where the device runs it fast),
            ``bf16`` or ``fp32``.
        base_checkpoint: The name the LM came from (recorded in the manifest; a saved ``lora``
            reader's adapter goes back on it to continue training).
        lora_rank, lora_alpha, lora_dropout: ``lora`` mode's adapter: its rank, its scale
            ``alpha / rank`` and the dropout on its input.
        lora_targets: The layers that get an adapter (names a module's name ends with); None:
            ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``. An ``lm`` that already carries a
            LoRA adapter (a peft model) keeps it; the four ``lora_*`` must then describe it.
        null_title, null_body: The null document's template.
        length_groups: Forwards the rows are split into by length (:meth:`scored_logits`).

    ``tokenizer`` stays None: the reader reads text, not the corpus's word pieces, so the
    pretraining stage's vocabulary check does not apply; the LM's tokenizer is ``lm_tokenizer``.
    """

    def __init__(self, lm: PreTrainedModel, lm_tokenizer: Any, *,
                 store: Optional[BlockStore] = None, examples_store: Optional[BlockStore] = None,
                 corpus_tokenizer: Any = None, layout: str = "prefix", mode: str = "frozen",
                 precision: str = "auto", base_checkpoint: Optional[str] = None,
                 lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 lora_targets: Optional[Sequence[str]] = None,
                 null_title: str = NULL_TITLE, null_body: str = NULL_BODY,
                 length_groups: int = 4):
        super().__init__()
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        self.length_groups = length_groups
        if mode not in MODES:
            raise ValueError(f"reader mode must be one of {MODES}, got {mode!r}")
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{base_checkpoint or type(lm).__name__}: no LM head to score with")
        self.name = base_checkpoint or getattr(lm_tokenizer, "name_or_path", type(lm).__name__)
        self.lora: Optional[LoraSettings] = None  # lora mode's adapter
        if mode == "lora":
            self.lora = LoraSettings.of(lora_rank, lora_alpha, lora_dropout, lora_targets)
            if not is_adapted(lm):  # (a peft model: an adapter loaded to continue training)
                lm = add_adapter(lm, self.lora, self.name)
                self.lora = settings_of(lm)  # (the targets the model has)
            elif settings_of(lm) != self.lora:
                raise ValueError(f"{self.name}: the model's LoRA adapter is {settings_of(lm)}, "
                                 f"the reader's lora_* arguments say {self.lora}")
        elif is_adapted(lm):
            raise ValueError(f"{self.name}: a model with an adapter reads in mode 'lora', not "
                             f"{mode!r} (merge it first for another mode)")
        self.lm = lm
        self.lm_tokenizer = lm_tokenizer
        self.base_checkpoint = base_checkpoint
        self.layout, self.mode, self.precision = layout, mode, precision
        self.null_title, self.null_body = null_title, null_body
        self.prompts = PromptBuilder(lm_tokenizer, layout, null_title, null_body, name=self.name)
        self.store: Optional[BlockStore] = None
        self.examples_store: Optional[BlockStore] = None
        self.corpus_tokenizer = corpus_tokenizer
        self.corpus_encoder: Optional[tuple[Any, Any, str]] = None  # (tokenizer, encoder, name)
        if store is not None:
            self.attach(store, examples_store, corpus_tokenizer)
        self.held = FrozenBf16(self.lm)  # (frozen, under bf16 autocast: scored_logits)
        if mode == "frozen":
            self.lm.requires_grad_(False)
            self.lm.eval()

    def attach(self, store: BlockStore, examples_store: Optional[BlockStore] = None,
               corpus_tokenizer: Any = None) -> "CausalLMReader":
        """Give the reader its knowledge store, the examples' store (default ``store``) and the
        tokenizer that store was cut with (default: the one its manifest names)."""
        self.store = store
        self.examples_store = examples_store if examples_store is not None else store
        self.corpus_tokenizer = corpus_tokenizer
        return self

    def examples_tokenizer(self) -> tuple[Any, str]:
        """The word-piece encoder of the tokenizer the examples' store was cut with (its
        manifest's unless given, loaded once) and the tokenizer's name."""
        if self.corpus_tokenizer is None:
            info = self.examples_store.manifest["tokenizer"]
            path = info.get("path")
            self.corpus_tokenizer = load_tokenizer(path if path and os.path.isdir(path)
                                                   else info["name"])
        if self.corpus_encoder is None or self.corpus_encoder[0] is not self.corpus_tokenizer:
            tok = self.corpus_tokenizer
            self.corpus_encoder = (tok, word_piece_encoder(tok),
                                   getattr(tok, "name_or_path", type(tok).__name__))
        return self.corpus_encoder[1:]

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def rebuilt_parameters(self) -> list[torch.nn.Parameter]:
        """The LM's weights a training checkpoint leaves out (the frozen ones, rebuilt from
        ``base_checkpoint`` on resume: :func:`realm.modeling.lm.rebuilt_parameters`)."""
        return rebuilt_parameters(self.lm, self.mode)

    @property
    def base_lm(self) -> PreTrainedModel:
        """The transformers model under the adapter (``lm`` itself outside ``lora`` mode)."""
        return self.lm.get_base_model() if self.lora is not None else self.lm

    def train(self, mode: bool = True) -> "CausalLMReader":
        """As nn.Module's; a frozen reader stays in eval mode."""
        super().train(mode)
        if self.mode == "frozen":
            self.lm.eval()
        return self

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "CausalLMReader":
        """A reader over a transformers causal LM: a directory, a hub name, or a packaged alias
        (``smollm2``); ``kwargs`` go to the constructor.

        Raises:
            ConfigError: A packaged model whose package is not installed (one line naming the
                install command), or a checkpoint that is not a causal LM.
        """
        lm, tokenizer = load_causal_lm(name_or_path, dtype)
        return cls(lm, tokenizer, base_checkpoint=name_or_path, **kwargs)

    # -- the reader interface (realm.modeling.readers.base.Reader) -------------------------

    def build_inputs(self, batch: MLMBatch, titles: Sequence[Sequence[np.ndarray]],
                     bodies: Sequence[Sequence[np.ndarray]], special: tuple[int, int, int],
                     max_length: int, block_ids: Optional[np.ndarray] = None) -> LMInputs:
        """The ``B * (k + 1)`` LM rows (:class:`~realm.modeling.readers.lm_inputs.LMInputs`) of
        the retrieved ``block_ids`` ``[B, k]`` (-1: none, read as the null template) and the null
        document, last; ``titles``, ``bodies`` and ``special`` (word pieces) are not read.
        Tokenizes on the CPU, reads no weights."""
        if block_ids is None:
            raise ValueError("the causal-LM reader reads the retrieved blocks' text: "
                             "build_inputs needs their block_ids")
        if self.store is None:
            raise ValueError("the causal-LM reader has no store: attach(store, examples_store) "
                             "first")
        spans = span_texts(batch, self.examples_store, *self.examples_tokenizer())
        blocks = [[(self.store.title(int(z)), self.store.text(int(z))) if z >= 0 else None
                   for z in row] for row in np.asarray(block_ids).reshape(len(spans), -1)]
        return self.prompts.build(spans, blocks, max_length)

    def scored_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at ``positions`` ``[N, M]`` of the right-padded rows ``[N, L]``
        only (the base model's hidden states there, through the LM head): ``[N, M, vocab]``.

        The rows go through the LM in ``length_groups`` forwards of rows of similar length,
        each cut to its longest row, so that short rows do not pay for the longest one's
        padding (the same logits; right padding never reaches a real token); the head runs
        once over every group's states. A frozen reader under bf16 autocast reads through bf16
        copies of its weights (:class:`realm.modeling.lm.FrozenBf16`), made once, not cast
        anew by each group's forward."""
        kind = input_ids.device.type
        held = (self.held if self.mode == "frozen" and self.held.under_bf16_autocast(kind)
                else None)
        lengths = attention_mask.sum(dim=1)  # [N]
        groups = min(self.length_groups, len(lengths))
        order = torch.argsort(lengths, descending=True)  # [N]
        parts = []
        for rows in (torch.tensor_split(order, groups) if groups > 1 else [order]):
            width = int(lengths[rows].max())
            parts.append(self.scored_states(input_ids[rows, :width], attention_mask[rows, :width],
                                            positions[rows], held))
        states = torch.cat(parts)[torch.argsort(order)]  # [N, M, hidden], rows in their order
        return head_logits(self.lm, states, held.head_weight() if held else None)

    def scored_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      positions: torch.Tensor, held: Optional[FrozenBf16] = None
                      ) -> torch.Tensor:
        """The base model's last hidden states at ``positions`` of one forward (over ``held``'s
        bf16 weights where given): ``[N, M, hidden]``."""
        decoder = self.lm.get_decoder()
        run = decoder if held is None else functools.partial(held.call, decoder)
        states = run(input_ids=input_ids, attention_mask=attention_mask,
                     use_cache=False).last_hidden_state  # [N, L, hidden]
        index = positions[:, :, None].expand(-1, -1, states.shape[-1])  # [N, M, hidden]
        return states.gather(1, index)

    def read(self, inputs: LMInputs, batch: MLMBatch) -> ReaderOutput:
        """One forward over the ``B * (k + 1)`` rows: ``log p(y|z, x)`` ``[B, k + 1]`` of each
        example's span and terminator, in the LM's tokens (``details``:
        :class:`CausalLMDetails`; ``logits`` None)."""
        device = self.device
        n, num_candidates = len(inputs.spans), inputs.num_candidates
        frozen = self.mode == "frozen"
        bf16 = frozen and autocast_dtype(self.precision, device) == "bf16"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen), \
                autocast(bf16, device):
            logits = self.scored_logits(inputs.input_ids.to(device),
                                        inputs.attention_mask.to(device),
                                        inputs.positions.to(device))  # [N, M, vocab]
        logits = logits.view(n, num_candidates, *logits.shape[1:])  # [B, C, M, vocab]
        targets = inputs.targets.to(device)  # [B, M]
        mask = inputs.target_mask.to(device)[:, None, :]  # [B, 1, M]
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, C, M, vocab]
        token_log_probs = log_probs.gather(
            -1, targets[:, None, :, None].expand(n, num_candidates, -1, 1)).squeeze(-1)
        token_log_probs = token_log_probs.masked_fill(~mask, 0.0)  # [B, C, M]
        details = CausalLMDetails(greedy=logits.detach().argmax(-1), targets=targets,
                                  span_mask=inputs.span_mask.to(device),
                                  target_ids=batch.target_ids)
        return ReaderOutput(log_p_y_given_z=token_log_probs.sum(-1),
                            token_log_probs=token_log_probs, logits=None, details=details,
                            target_mask=inputs.target_mask.to(device))

    def predict(self, out: ReaderOutput, log_p_z: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Span exact match as word-piece rows ``([B, M], [B, M])``: an example's
        ``target_ids`` where the LM's greedy tokens reproduce its span under its most probable
        candidate (by ``log p(z|x)`` ``[B, C]``) / under the null document, else -1."""
        d: CausalLMDetails = out.details
        with torch.no_grad():
            best = log_p_z.argmax(dim=1).to(d.greedy.device)  # [B]
            rows = torch.arange(len(best), device=best.device)
            hit = ((d.greedy == d.targets[:, None]) | ~d.span_mask[:, None]).all(-1)  # [B, C]
            exact, exact_null = hit[rows, best].cpu(), hit[:, -1].cpu()  # [B] each
            miss = torch.full_like(d.target_ids, -1)
            return (torch.where(exact[:, None], d.target_ids, miss),
                    torch.where(exact_null[:, None], d.target_ids, miss))

    def enable_gradient_checkpointing(self) -> None:
        """The LM's gradient checkpointing (non-reentrant)."""
        self.lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        metadata: Optional[dict[str, Any]] = None,
                        overwrite: bool = False) -> Path:
        """Write the LM as a transformers causal-LM directory (weights, config, tokenizer:
        ``AutoModelForCausalLM.from_pretrained(dir)`` opens it) with a ``causal_lm_reader``
        manifest, atomically.

        In ``lora`` mode the weights are the merged ``W + (alpha / rank) B A`` (merged in a copy;
        the reader keeps training its adapter), and peft's adapter directory goes in
        ``adapter/`` (``PeftModel.from_pretrained(base, dir / "adapter")`` opens it)."""
        target = Path(save_directory)
        with atomic_directory(target, overwrite=overwrite) as tmp:
            (merged_copy(self.lm) if self.lora is not None else self.lm).save_pretrained(tmp)
            self.lm_tokenizer.save_pretrained(str(tmp))
            fields = {
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(self.lm.config, "model_type", None),
                "architecture": type(self.base_lm).__name__,
                "hidden_size": self.lm.config.hidden_size,
                "vocab_size": self.lm.config.vocab_size,
                "layout": self.layout,
                "mode": self.mode,
                "null_title": self.null_title,
                "null_body": self.null_body,
                "model": ".",
                "tokenizer": ".",
            }
            if self.lora is not None:
                self.lm.save_pretrained(str(tmp / ADAPTER_DIR))
                fields.update(lora=self.lora.to_dict(), adapter=ADAPTER_DIR)
            write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved causal-LM reader to %s", target)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *,
                        device: Optional[str | torch.device] = None,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> "CausalLMReader":
        """Load a directory written by :meth:`save_pretrained`; ``kwargs`` (``store``,
        ``examples_store``, ``mode``, ``layout``, ...) override what it recorded.

        The mode is the recorded one, except that a ``lora`` directory loads its merged weights
        ``frozen`` (for inference) unless ``mode`` says otherwise; ``mode="lora"`` puts its saved
        adapter back on the recorded ``base_checkpoint`` to continue training it.

        Raises:
            ConfigError: ``mode="lora"`` on a ``lora`` directory whose base checkpoint does not
                resolve, or is not the model the adapter was trained on.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        adapter = manifest.get("adapter")
        options = {"layout": manifest.get("layout", "prefix"),
                   "mode": "frozen" if adapter else manifest.get("mode", "frozen"),
                   "null_title": manifest.get("null_title", NULL_TITLE),
                   "null_body": manifest.get("null_body", NULL_BODY),
                   "base_checkpoint": manifest.get("base_checkpoint")}
        if adapter:
            lora = LoraSettings.from_dict(manifest["lora"])
            options.update(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           lora_targets=lora.targets)
        options.update(kwargs)
        if adapter and options["mode"] == "lora":  # the same adapter, on its base, trainable
            lm = load_adapter(adapter_base(directory, manifest, dtype), directory / adapter)
        else:
            lm = AutoModelForCausalLM.from_pretrained(directory / manifest["model"], dtype=dtype)
        tokenizer = load_tokenizer(str(directory / manifest["tokenizer"]))
        reader = cls(lm, tokenizer, **options)
        if device is not None:
            reader.to(device)
        logger.info("loaded causal-LM reader from %s", directory)
        return reader

