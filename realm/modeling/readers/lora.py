"""LoRA adapters on a causal LM: the causal-LM reader's ``lora`` mode (peft, imported where used).

Low-rank adapters (Hu et al. 2021) on the attention projections: each target linear layer's
``W x`` becomes ``W x + (alpha / rank) B A x`` with ``A`` ``[rank, in]`` and ``B`` ``[out, rank]``
the only weights that train; ``B`` starts at 0, so a new adapter scores exactly as its base::

    lm = add_adapter(lm, LoraSettings(rank=8, alpha=16.0), name="smollm2")  # a peft PeftModel
    merged = merged_copy(lm)           # a plain transformers model holding W + (alpha / rank) B A
    lm.save_pretrained("dir/adapter")  # peft's adapter directory (adapter_config.json, weights)
    lm = load_adapter(base, "dir/adapter")   # that adapter on its base again, trainable

A :class:`peft.PeftModel` forwards what it does not define to the transformers model under it
(``get_decoder()``, ``get_output_embeddings()``, ``config``), whose target layers now hold the
adapters, so the reader scores through it as through the bare model.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from realm.errors import ConfigError
from realm.modeling.lm import load_causal_lm

logger = logging.getLogger(__name__)

#: The attention projections of Llama-style models (Llama, SmolLM2, Qwen, Mistral, Gemma).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Where a saved reader keeps its adapter, beside the merged weights.
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA adapter's shape.

    Attributes:
        rank: The rank r of ``B A``.
        alpha: The update's scale is ``alpha / rank``.
        dropout: Dropout on the adapter's input while training.
        targets: Names of the linear layers that get an adapter (a module matches when its
            name ends with one), sorted; default :data:`DEFAULT_TARGETS`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank > 0, alpha > 0 and dropout in [0, 1); got {self}")
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets or DEFAULT_TARGETS))))
        object.__setattr__(self, "alpha", float(self.alpha))

    @classmethod
    def of(cls, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
           targets: Optional[Iterable[str]] = None) -> "LoraSettings":
        """The settings of these constructor-style arguments (``targets`` None: the default)."""
        names = (targets,) if isinstance(targets, str) else tuple(targets or DEFAULT_TARGETS)
        return cls(rank, alpha, dropout, names)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``lora`` record."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "LoraSettings":
        return cls.of(record["rank"], record["alpha"], record.get("dropout", 0.0),
                      record.get("targets"))


def is_adapted(lm: nn.Module) -> bool:
    """Whether ``lm`` is a peft model (an adapter over a transformers model)."""
    return hasattr(lm, "peft_config") and hasattr(lm, "get_base_model")


def settings_of(lm: nn.Module) -> LoraSettings:
    """The settings of a peft model's active LoRA adapter."""
    config = lm.peft_config[lm.active_adapter]
    if getattr(config, "peft_type", None) != "LORA":
        raise ValueError(f"the model's adapter is {config.peft_type}, not LoRA")
    return LoraSettings.of(config.r, config.lora_alpha, config.lora_dropout,
                           config.target_modules)


def add_adapter(lm: nn.Module, settings: LoraSettings, name: str) -> nn.Module:
    """``lm`` (a transformers causal LM, changed in place) under a new LoRA adapter: a
    :class:`peft.PeftModel` whose adapter weights alone require grad.

    Raises:
        ConfigError: None of ``settings.targets`` names a layer of the model (the message names
            the model ``name`` and its layers that could be targets).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    layers = {module_name.rsplit(".", 1)[-1] for module_name, module in lm.named_modules()
              if module_name and not list(module.children())
              and getattr(getattr(module, "weight", None), "ndim", 0) == 2}
    missing = [t for t in settings.targets if t not in layers]
    if len(missing) == len(settings.targets):
        raise ConfigError(f"LoRA on {name!r} ({type(lm).__name__}): none of the target modules "
                          f"{', '.join(settings.targets)} is a layer of it; its layers that "
                          f"could be: {', '.join(sorted(layers))}")
    if missing:
        logger.warning("LoRA on %r: no layer named %s; adapting %s", name, ", ".join(missing),
                       ", ".join(t for t in settings.targets if t not in missing))
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout,
                        target_modules=[t for t in settings.targets if t not in missing])
    adapted = get_peft_model(lm, config)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    logger.info("LoRA on %r: rank %d, alpha %g over %s: %d of %d weights train", name,
                settings.rank, settings.alpha, ", ".join(config.target_modules), trainable, total)
    return adapted


def merged_copy(lm: nn.Module) -> nn.Module:
    """A copy of the peft model ``lm`` with its adapter merged into the base weights: a plain
    transformers model (``lm`` itself is left as it is)."""
    return copy.deepcopy(lm).merge_and_unload()


def load_adapter(base: nn.Module, directory: str | os.PathLike,
                 trainable: bool = True) -> nn.Module:
    """The adapter saved in ``directory`` (peft's ``save_pretrained``) on ``base``; its weights
    require grad when ``trainable``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


def adapter_base(directory: str | os.PathLike, manifest: dict[str, Any],
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base checkpoint a saved ``lora`` model's adapter was trained on, as its manifest
    records it (``base_checkpoint``, checked against the recorded ``model_type``,
    ``hidden_size`` and ``vocab_size``): the causal-LM reader's and the RAG generator's.

    Raises:
        ConfigError: No base checkpoint recorded, one that does not resolve, or one that is not
            the model the adapter was trained on (each names the directory).
    """
    name = manifest.get("base_checkpoint")
    if not name:
        raise ConfigError(f"{directory}: its manifest records no base_checkpoint to put the "
                          f"saved LoRA adapter on; load it without mode='lora' (the merged "
                          f"weights)")
    try:
        lm, _ = load_causal_lm(name, dtype)
    except ConfigError as err:
        raise ConfigError(f"{directory}: the base checkpoint of its LoRA adapter, {name!r}, does "
                          f"not resolve ({err}); load it without mode='lora' (the merged "
                          f"weights)") from None
    recorded = {key: manifest.get(key) for key in ("model_type", "hidden_size", "vocab_size")}
    found = {key: getattr(lm.config, key, None) for key in recorded}
    if recorded != found:
        raise ConfigError(f"{directory}: its LoRA adapter was trained on {name!r} as {recorded}, "
                          f"but {name!r} is now {found}")
    return lm
