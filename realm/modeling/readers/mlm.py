"""The masked-LM reader (the knowledge-augmented encoder): REALM's ``p(y|z, x)``, a masked LM
over ``x`` joined with ``z``; the first :class:`~realm.modeling.readers.base.Reader`.

Each query ``x`` (a passage with masked tokens) is joined with each of its ``k + 1`` candidate
blocks ``z`` (the ``k`` retrieved blocks and the null document) as
``[CLS] x [SEP] title [SEP] body [SEP]``; the null document is the empty block, so its sequence
is ``[CLS] x [SEP] [SEP]``. ``x`` sits at the same offset in every candidate, so the masked
positions are shared by the ``k + 1`` sequences of a query
(:func:`realm.modeling.inputs.build_joined_inputs`)::

    ka = KnowledgeAugmentedEncoder.from_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    joined = build_joined_inputs(queries, titles, bodies, cls_id, sep_id, pad_id,
                                 mask_positions=positions)           # [B * (k + 1), seq_len]
    out = ka(joined.input_ids, joined.attention_mask, joined.token_type_ids,
             mask_positions=joined.mask_positions, labels=targets, label_mask=target_mask)
    out.log_probs_of_targets                                         # [B, k + 1]
    ka.save_pretrained("run/ka_encoder")                             # atomic directory

The masked-LM head comes from the checkpoint when it has one; otherwise (encoder-only
checkpoints such as MiniLM) a new head is initialised with its decoder tied to the input word
embeddings. A saved encoder is a self-describing directory that is also a plain transformers
masked-LM directory (``AutoModelForMaskedLM.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)``)::

    manifest.json        kind "knowledge_augmented_encoder", base checkpoint, sizes, version
    config.json, model.safetensors, tokenizer files   (transformers masked-LM format)

Directories of format 1 (``model/`` and ``tokenizer/`` subdirectories) still load. The copy
head lives in :mod:`realm.modeling.readers.copy`, the vocabulary-chunked scoring
(``vocab_chunk``) in :mod:`realm.modeling.readers.target_logprobs`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from realm.artifacts import atomic_directory, load_saved_tokenizer, read_manifest, write_manifest
from realm.data.mlm import MLMBatch
from realm.hub import load_pretrained, load_tokenizer, resolve_model_path
from realm.modeling.inputs import JoinedInputs, build_joined_inputs
from realm.modeling.readers.base import Reader, ReaderOutput
from realm.modeling.readers.copy import CopyHead, CopyScores, copy_mixture, copy_predictions
from realm.modeling.readers.target_logprobs import chunked_predictions, target_log_probs

logger = logging.getLogger(__name__)

MANIFEST_KIND = "knowledge_augmented_encoder"
FORMAT_VERSION = 2
MODEL_DIR = "."  # format 1: "model"
COPY_HEAD_FILE = "copy_head.safetensors"  # beside the masked LM; transformers ignores it


@dataclass
class KnowledgeAugmentedOutput:
    """What the knowledge-augmented encoder returns; fields it did not compute stay None.

    Attributes:
        logits: Masked-LM logits. With ``mask_positions``: at the masked positions only,
            ``[B, k + 1, max_masked, vocab]``; without: every position,
            ``[B * (k + 1), seq_len, vocab]``.
        token_log_probs: ``log p(y_j|z, x)`` of each target token, 0 on padding,
            ``[B, k + 1, max_masked]`` (float32).
        log_probs_of_targets: ``log p(y|z, x) = Σ_j log p(y_j|z, x)`` over each query's masked
            tokens, per candidate, ``[B, k + 1]`` (float32).
        hidden: On the vocabulary-chunked path (``vocab_chunk``): the decoder inputs at the
            masked positions, ``[B, k + 1, M, hidden]``, and ``logits`` is None;
            ``normalizer``: the logsumexp over the vocabulary, ``[B, k + 1, M]``.
        copy: With a copy head: its gate and attention (:class:`CopyScores`); ``logits`` are
            then the vocabulary part only, and ``token_log_probs`` the mixture's.
    """

    logits: Optional[torch.Tensor]
    token_log_probs: Optional[torch.Tensor] = None
    log_probs_of_targets: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    normalizer: Optional[torch.Tensor] = None
    copy: Optional[CopyScores] = None


def tie_output_embeddings(mlm: PreTrainedModel) -> None:
    """Tie a masked-LM's decoder weight to its input word embeddings (the same Parameter)."""
    output, inputs = mlm.get_output_embeddings(), mlm.get_input_embeddings()
    if output is None:
        raise ValueError(f"{type(mlm).__name__} has no output embeddings to tie")
    mlm.config.tie_word_embeddings = True  # saved with the config: re-tied on load
    mlm.tie_weights()
    if output.weight is not inputs.weight:
        output.weight = inputs.weight


class KnowledgeAugmentedEncoder(Reader):
    """A transformers masked LM that reads ``[CLS] x [SEP] z [SEP]`` and scores the masked tokens.

    Build it with :meth:`from_checkpoint`, :meth:`from_config`, :meth:`from_pretrained` or
    :func:`build_ka_encoder`.

    Args:
        mlm: Any ``AutoModelForMaskedLM`` model.
        tokenizer: The checkpoint's tokenizer, saved with the model; None for tiny models.
        base_checkpoint: Name the model was initialised from (recorded in the manifest).
        head_initialised: Whether the masked-LM head was newly initialised (not in the
            checkpoint); recorded in the manifest.
    """

    def __init__(
        self,
        mlm: PreTrainedModel,
        *,
        tokenizer: Any = None,
        base_checkpoint: Optional[str] = None,
        head_initialised: bool = False,
    ):
        super().__init__()
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.base_checkpoint = base_checkpoint
        self.head_initialised = head_initialised
        #: With labels: score the targets over the vocabulary in chunks of this many words
        #: (:func:`target_log_probs`), never building the ``[B, k + 1, M, vocab]`` logits
        #: (``logits`` is then None and ``hidden`` holds the decoder inputs). 0: the logits.
        self.vocab_chunk = 0
        #: A pointer over the block's word pieces (:class:`CopyHead`), or None.
        self.copy_head: Optional[CopyHead] = None

    def add_copy_head(self) -> CopyHead:
        """Give the reader a new :class:`CopyHead` (kept if it has one)."""
        if self.copy_head is None:
            self.copy_head = CopyHead(self.config.hidden_size).to(
                next(self.mlm.parameters()).device)
        return self.copy_head

    def decoder_parts(self) -> Optional[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """``(transform, weight, bias)`` of a BERT-style head (transform, then a linear decoder),
        or None for heads of another shape (which then always build the logits)."""
        head = self._head()
        predictions = getattr(head, "predictions", None)
        transform = getattr(predictions, "transform", None)
        decoder = getattr(predictions, "decoder", None)
        if transform is None or not isinstance(decoder, nn.Linear) or decoder.bias is None:
            return None
        return transform, decoder.weight, decoder.bias

    def predictions(self, out: KnowledgeAugmentedOutput, log_p_z: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``argmax_y Σ_z p(z|x) p(y_j|z, x)`` and the last candidate's own argmax at each masked
        position, ``([B, M], [B, M])``, from the logits or (chunked) from ``hidden``."""
        with torch.no_grad():
            if out.logits is not None:
                log_probs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, k + 1, M, V]
                if out.copy is not None:  # the last candidate's own: λ is 0 on the null one
                    return (copy_predictions(log_probs, out.copy, log_p_z),
                            out.logits[:, -1].argmax(dim=-1))
                marginal = torch.logsumexp(log_p_z[:, :, None, None].float() + log_probs, dim=1)
                return marginal.argmax(dim=-1), out.logits[:, -1].argmax(dim=-1)
            _, weight, bias = self.decoder_parts()
            return chunked_predictions(out.hidden, weight, bias, log_p_z, self.vocab_chunk,
                                       normalizer=out.normalizer, copy=out.copy)

    @property
    def config(self) -> PretrainedConfig:
        return self.mlm.config

    @property
    def input_embeddings(self) -> nn.Module:
        """The word-embedding table, ``[vocab, hidden]``."""
        return self.mlm.get_input_embeddings()

    @property
    def output_embeddings(self) -> nn.Module:
        """The head's decoder (hidden -> vocab); tied to :attr:`input_embeddings` when new."""
        return self.mlm.get_output_embeddings()

    def _head(self) -> Optional[nn.Module]:
        """The head module when the model is exactly ``backbone`` + ``head`` (BERT, RoBERTa)."""
        children = [
            module for name, module in self.mlm.named_children()
            if name != self.mlm.base_model_prefix
        ]
        return children[0] if len(children) == 1 else None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        name_or_path: str,
        *,
        with_tokenizer: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> "KnowledgeAugmentedEncoder":
        """A masked LM from a transformers checkpoint; a tied new head when it has none.

        Args:
            name_or_path: Local directory, hub name, or packaged alias (see
                :func:`realm.hub.resolve_model_path`).
            with_tokenizer: Also load the checkpoint's (fast) tokenizer, saved with the model.
            dtype: Parameter dtype.
        """
        path = resolve_model_path(name_or_path)
        mlm, info = load_pretrained(AutoModelForMaskedLM.from_pretrained, path,
                                    "masked LM", dtype=dtype)
        prefix = mlm.base_model_prefix + "."
        missing_head = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
        if missing_head:
            tie_output_embeddings(mlm)
            logger.info(
                "%s has no masked-LM head: initialised a new one (%d tensors, e.g. %s), decoder "
                "tied to the input word embeddings", name_or_path, len(missing_head),
                missing_head[0],
            )
        tokenizer = load_tokenizer(name_or_path) if with_tokenizer else None
        return cls(
            mlm, tokenizer=tokenizer, base_checkpoint=name_or_path,
            head_initialised=bool(missing_head),
        )

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "KnowledgeAugmentedEncoder":
        """Randomly initialised masked LM from a config (tiny test models), decoder tied."""
        mlm = AutoModelForMaskedLM.from_config(config)
        tie_output_embeddings(mlm)
        logger.info("initialised a %s masked LM from a config", type(mlm).__name__)
        return cls(mlm, head_initialised=True)

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        mask_positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
    ) -> KnowledgeAugmentedOutput:
        """Score the masked tokens of each query against each of its candidates.

        Args:
            input_ids: Joined sequences, query-major, ``[B * (k + 1), seq_len]``
                (:func:`build_joined_inputs`).
            attention_mask: ``[B * (k + 1), seq_len]``.
            token_type_ids: ``[B * (k + 1), seq_len]`` or None (all zeros).
            mask_positions: Masked positions in the joined sequences, ``[B, max_masked]``; the
                logits are then computed at these positions only.
            labels: Target ids of the masked tokens, ``[B, max_masked]``; needs
                ``mask_positions``.
            label_mask: True on real targets, ``[B, max_masked]``; None means all are real.

        Returns:
            :class:`KnowledgeAugmentedOutput`; ``token_log_probs`` and
            ``log_probs_of_targets`` only when ``labels`` are given.
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if mask_positions is None:
            if labels is not None:
                raise ValueError("labels need mask_positions")
            logits = self.mlm(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).logits  # [N, seq_len, vocab]
            return KnowledgeAugmentedOutput(logits=logits)
        n, seq_len = input_ids.shape
        batch, max_masked = mask_positions.shape
        if n % batch:
            raise ValueError(f"{n} sequences are not a whole number of candidates for {batch}")
        num_candidates = n // batch
        head = self._head()
        if head is not None:
            # Run the head on the masked positions only: [B, k + 1, M, vocab], not [N, L, vocab].
            states = self.mlm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).last_hidden_state  # [N, seq_len, hidden]
        else:  # no separable head: full logits, then pick the masked positions
            states = self.mlm(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).logits  # [N, seq_len, vocab]
        states = states.view(batch, num_candidates, seq_len, -1)  # [B, k + 1, L, hidden|vocab]
        index = mask_positions[:, None, :, None].expand(
            batch, num_candidates, max_masked, states.shape[-1]
        )  # [B, k + 1, M, hidden|vocab]
        picked = states.gather(2, index)  # [B, k + 1, M, hidden|vocab]
        copy = None
        if self.copy_head is not None and token_type_ids is not None:
            if head is None:
                raise ValueError(f"a copy head needs a separable masked-LM head; "
                                 f"{type(self.mlm).__name__} has none")
            shape = (batch, num_candidates, seq_len)
            # the block's word pieces: the second segment without its separators (each row,
            # right-padded, ends in [SEP]); none in the null document's [CLS] x [SEP] [SEP]
            last = input_ids.gather(1, (attention_mask.sum(1, keepdim=True) - 1).clamp(min=0))
            support = ((token_type_ids == 1) & attention_mask.bool() & (input_ids != last)
                       ).view(shape)
            copy = self.copy_head(picked, states, input_ids.view(shape), support)
        parts = self.decoder_parts() if labels is not None and self.vocab_chunk else None
        if parts is not None:  # the lean path: never the [B, k + 1, M, vocab] logits
            transform, weight, bias = parts
            hidden = transform(picked)  # [B, k + 1, M, hidden]
            targets = labels[:, None, :].expand(batch, num_candidates, max_masked)
            token_log_probs, normalizer = target_log_probs(
                hidden, weight, bias, targets, self.vocab_chunk, with_normalizer=True)
            if copy is not None:
                token_log_probs = copy_mixture(token_log_probs, copy, targets)
            if label_mask is not None:
                token_log_probs = token_log_probs.masked_fill(~label_mask.bool()[:, None, :], 0.0)
            return KnowledgeAugmentedOutput(logits=None, token_log_probs=token_log_probs,
                                            log_probs_of_targets=token_log_probs.sum(dim=-1),
                                            hidden=hidden, normalizer=normalizer, copy=copy)
        logits = head(picked) if head is not None else picked  # [B, k + 1, M, vocab]
        if labels is None:
            return KnowledgeAugmentedOutput(logits=logits, copy=copy)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, k + 1, M, vocab]
        targets = labels[:, None, :, None].expand(batch, num_candidates, max_masked, 1)
        token_log_probs = log_probs.gather(-1, targets).squeeze(-1)  # [B, k + 1, M]
        if copy is not None:
            token_log_probs = copy_mixture(token_log_probs, copy, targets.squeeze(-1))
        if label_mask is not None:
            token_log_probs = token_log_probs.masked_fill(~label_mask.bool()[:, None, :], 0.0)
        return KnowledgeAugmentedOutput(
            logits=logits,
            token_log_probs=token_log_probs,
            log_probs_of_targets=token_log_probs.sum(dim=-1),  # [B, k + 1]
            copy=copy,
        )

    # -- the reader interface (realm.modeling.readers.base.Reader) -------------------------

    def build_inputs(self, batch: MLMBatch, titles: Sequence[Sequence[np.ndarray]],
                     bodies: Sequence[Sequence[np.ndarray]], special: tuple[int, int, int],
                     max_length: int, block_ids: Optional[np.ndarray] = None) -> JoinedInputs:
        """The ``B * (k + 1)`` joined sequences ``[CLS] x [SEP] title [SEP] body [SEP]``, the null
        document last (:func:`~realm.modeling.inputs.build_joined_inputs`); ``block_ids`` is not
        needed (the word pieces are given)."""
        cls_id, sep_id, pad_id = special
        return build_joined_inputs(batch.query_ids, titles, bodies, cls_id, sep_id, pad_id,
                                   max_length=max_length, mask_positions=batch.mask_positions,
                                   append_null=True)

    def read(self, inputs: JoinedInputs, batch: MLMBatch) -> ReaderOutput:
        """One pass over the ``B * (k + 1)`` joined sequences: ``log p(y|z, x)`` ``[B, k + 1]``
        of the batch's targets (``details``: the :class:`KnowledgeAugmentedOutput`)."""
        device = next(self.mlm.parameters()).device
        out = self(inputs.input_ids.to(device), inputs.attention_mask.to(device),
                   inputs.token_type_ids.to(device), inputs.mask_positions.to(device),
                   labels=batch.target_ids.to(device), label_mask=batch.target_mask.to(device))
        return ReaderOutput(log_p_y_given_z=out.log_probs_of_targets,
                            token_log_probs=out.token_log_probs, logits=out.logits, details=out)

    def predict(self, out: ReaderOutput, log_p_z: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predictions` of :meth:`read`'s output, ``([B, M], [B, M])``."""
        return self.predictions(out.details, log_p_z)

    def enable_gradient_checkpointing(self) -> None:
        """The masked LM's gradient checkpointing (non-reentrant)."""
        self.mlm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        metadata: Optional[dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a self-describing directory, atomically (as :meth:`Retriever.save_pretrained`).

        Args:
            save_directory: Target directory; must not exist unless ``overwrite``.
            tokenizer: Tokenizer to save; defaults to the one the encoder was built with.
            metadata: Extra JSON-able fields for the manifest (e.g. the training step).
            overwrite: Replace an existing directory.

        Returns:
            The target directory.
        """
        target = Path(save_directory)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(target, overwrite=overwrite) as tmp:
            self.mlm.save_pretrained(tmp / MODEL_DIR)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / MODEL_DIR))
            if self.copy_head is not None:
                save_file({k: v.detach().cpu().contiguous()
                           for k, v in self.copy_head.state_dict().items()}, tmp / COPY_HEAD_FILE)
            fields = {
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(self.config, "model_type", None),
                "architecture": type(self.mlm).__name__,
                "hidden_size": self.config.hidden_size,
                "vocab_size": self.config.vocab_size,
                "head_initialised": self.head_initialised,
                "tied_embeddings": self.output_embeddings.weight is self.input_embeddings.weight,
                "model": MODEL_DIR,
                "tokenizer": MODEL_DIR if tokenizer is not None else None,
                "copy_head": COPY_HEAD_FILE if self.copy_head is not None else None,
            }
            write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved knowledge-augmented encoder to %s", target)
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: Optional[str | torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "KnowledgeAugmentedEncoder":
        """Load a directory written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: No ``manifest.json``.
            ValueError: The manifest is of another kind, or a listed file is missing or has
                the wrong size.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        mlm = AutoModelForMaskedLM.from_pretrained(directory / manifest["model"], dtype=dtype)
        if manifest.get("tied_embeddings"):
            tie_output_embeddings(mlm)
        tokenizer = load_saved_tokenizer(directory, manifest)
        encoder = cls(
            mlm, tokenizer=tokenizer, base_checkpoint=manifest.get("base_checkpoint"),
            head_initialised=bool(manifest.get("head_initialised")),
        )
        if manifest.get("copy_head"):
            encoder.add_copy_head().load_state_dict(load_file(directory / manifest["copy_head"]))
        if device is not None:
            encoder.to(device)
        logger.info("loaded knowledge-augmented encoder from %s", directory)
        return encoder


def load_ka_encoder(path: str) -> KnowledgeAugmentedEncoder:
    """A saved knowledge-augmented encoder directory, or any transformers checkpoint (a new
    tied head when it has none)."""
    if os.path.exists(os.path.join(path, "manifest.json")):
        return KnowledgeAugmentedEncoder.from_pretrained(path)
    return KnowledgeAugmentedEncoder.from_checkpoint(path)


def build_ka_encoder(
    name_or_path: Optional[str] = None,
    *,
    config: Optional[PretrainedConfig] = None,
    **kwargs: Any,
) -> KnowledgeAugmentedEncoder:
    """Builder: a knowledge-augmented encoder from a checkpoint name/path or a config.

    Args:
        name_or_path: Checkpoint to initialise from (with or without a masked-LM head).
        config: A transformers config (e.g. ``BertConfig``) for a randomly initialised model.
        **kwargs: Passed to :meth:`KnowledgeAugmentedEncoder.from_checkpoint`
            (``with_tokenizer``, ``dtype``).
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of name_or_path or config")
    if config is not None:
        return KnowledgeAugmentedEncoder.from_config(config)
    return KnowledgeAugmentedEncoder.from_checkpoint(name_or_path, **kwargs)
