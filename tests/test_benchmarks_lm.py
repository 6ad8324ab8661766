"""benchmarks/lm_reader_step.py's cheap parts: its options, and that its bare LM scores the
reader's rows exactly as the causal-LM reader does (so REALM is timed against the same work)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from realm.modeling.readers import CausalLMReader
from realm.modeling.readers.lm_inputs import LMInputs

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_reader_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lm_reader_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options(bench):
    args = bench.parse_args([])
    assert (args.steps, args.warmup, args.threads) == (5, 1, 2)
    assert args.modes == ["frozen", "full", "lora"] and args.precisions == ["bf16", "fp32"]
    args = bench.parse_args(["--modes", "lora", "--precisions", "fp32", "--steps", "1",
                             "--warmup", "0"])
    assert args.modes == ["lora"] and args.precisions == ["fp32"] and args.steps == 1
    for bad in (["--modes", "frozen,qlora"], ["--precisions", "fp16"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def _rows(vocab: int, n: int = 2, c: int = 3, length: int = 12, m: int = 3) -> LMInputs:
    """Right-padded rows of ``n`` examples x ``c`` candidates, each ending with its scored
    tokens (the second example scores 2 of ``m``)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n * c, length), generator=g)
    mask = torch.zeros(n * c, length, dtype=torch.long)
    targets = torch.randint(3, vocab, (n, m), generator=g)
    target_mask = torch.ones(n, m, dtype=torch.bool)
    target_mask[1, -1] = False
    positions = torch.zeros(n * c, m, dtype=torch.long)
    for row in range(n * c):
        b = row // c
        real = length - (row % 4)
        scored = int(target_mask[b].sum())
        mask[row, :real] = 1
        ids[row, real - scored:real] = targets[b, :scored]
        positions[row, :scored] = torch.arange(real - scored - 1, real - 1)
    return LMInputs(input_ids=ids, attention_mask=mask, positions=positions, targets=targets,
                    target_mask=target_mask, span_mask=target_mask.clone(), spans=[None] * n)


def test_the_bare_lm_scores_as_the_reader_reads(bench, make_tiny_lm, lm_tokenizer):
    reader = CausalLMReader(make_tiny_lm(lm_tokenizer), lm_tokenizer, precision="fp32")
    inputs = _rows(len(lm_tokenizer))
    batch = SimpleNamespace(target_ids=torch.zeros(2, 1, dtype=torch.long))
    with torch.no_grad():
        expected = reader.read(inputs, batch).token_log_probs
        got = bench.bare_scores(reader.lm, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bool((got[1, :, -1] == 0).all())  # an unscored token counts nothing


def test_a_bare_step_trains_only_outside_frozen_mode(bench, make_tiny_lm, lm_tokenizer):
    inputs = _rows(len(lm_tokenizer))
    for train in (False, True):
        lm = make_tiny_lm(lm_tokenizer)
        lm.requires_grad_(train)
        before = lm.get_output_embeddings().weight.detach().clone()
        bare = bench.BareLM(lm, train=train, bf16=False, lr=1e-2, weight_decay=0.0, max_norm=1.0)
        timer = bench.Timer()
        assert bare.step(inputs, timer) > 0
        changed = not torch.equal(before, lm.get_output_embeddings().weight)
        assert changed == train
        assert set(timer.seconds) == ({"forward", "backward", "optimizer"} if train
                                      else {"forward"})
