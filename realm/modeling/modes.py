"""Train / eval mode for a stretch of inference, restored module by module afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` and every submodule in eval mode inside the block; afterwards each gets back
    its own mode.

    ``was = m.training; m.eval(); ...; m.train(was)`` is not a restore: ``train(True)`` switches
    every submodule to training mode, so a backbone that ``from_pretrained`` loaded in eval mode
    inside a wrapper still in training mode leaves with its dropout on, and what it encodes next
    is noisy (the Open-QA positive-block search found 1.5% fewer positives after a cold index
    build than over a cached index).
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
