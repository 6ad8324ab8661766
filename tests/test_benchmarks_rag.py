"""benchmarks/rag.py end to end on a tiny config: a random 2-layer Llama (SmolLM2's tokenizer) as
the LoRA generator over BM25 (or a tiny dense retriever) on 20 real SQuAD passages, 2 timed
training steps and 3 dev questions: one JSON object with every training precision and decoding
mode measured."""

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from realm.modeling.rag import METHODS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "rag.py"


@pytest.fixture(scope="module")
def bench():
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))  # its functions, main() not run


def test_options(bench):
    args = bench.parse_args([])
    assert (args.steps, args.warmup, args.eval_questions, args.retriever) == (8, 2, 40, "bm25")
    assert args.modes == list(METHODS) and args.config.endswith("configs/rag_leads.yaml")
    for bad in (["--modes", "greedy,nucleus"], ["--steps", "0"], ["--eval-questions", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_it_measures_training_every_decoding_mode_and_latency(bench, squad_tiny, tiny_generator,
                                                              tmp_path, capsys):
    qa = squad_tiny / "qa.jsonl"
    assert bench.main([
        "--steps", "2", "--warmup", "0", "--eval-questions", "3", "--latency-questions", "2",
        f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={qa}", f"openqa.dev_qa={qa}",
        f"openqa.generator={tiny_generator}", "openqa.k=2", "openqa.beam_size=2",
        "openqa.max_generator_tokens=96", "openqa.max_answer_tokens=4",
        "openqa.eval_batch_size=4", "openqa.recall_ks=[1,2]", "retriever.max_block_tokens=160",
        "train.batch_size=2", f"cache_dir={tmp_path / 'cache'}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "rag" and out["retriever"] == "bm25" and out["blocks"] > 0
    assert out["generator_mode"] == "lora" and out["k"] == 2 and out["steps_timed"] == 2
    train = out["train"]
    for name in ("fp32", "bf16"):
        assert train[name]["questions_per_s"] > 0 and train[name]["mean_loss"] > 0
        assert train[name]["trainable_params"] > 0  # the LoRA adapter (BM25: no query encoder)
    assert train["bf16_over_fp32"] > 0
    assert set(out["decoding"]) == set(METHODS)
    for mode, runs in out["decoding"].items():
        for name in ("fp32", "bf16"):
            assert runs[name]["questions"] == 3, mode
            assert runs[name]["questions_per_s"] > 0, mode
            assert 0.0 <= runs[name]["exact_match"] <= 1.0, mode
        assert runs["bf16_over_fp32"] > 0
    latency = out["answer_latency"]
    assert latency["questions"] == 2 and latency["precision"] == "bf16"
    assert 0 < latency["s_per_question"] <= latency["max_s"] and latency["meets_goal"]
    assert len(out["load_avg_1m"]) == 2


def test_a_dense_retriever_trains_its_query_encoder_too(bench, squad_tiny, tiny_generator,
                                                        tiny_retriever, tmp_path, capsys):
    qa = squad_tiny / "qa.jsonl"
    common = [f"corpus={squad_tiny / 'corpus'}", f"openqa.train_qa={qa}", f"openqa.dev_qa={qa}",
              f"openqa.generator={tiny_generator}", "openqa.k=2",
              "openqa.max_generator_tokens=96", "openqa.max_answer_tokens=4",
              "openqa.recall_ks=[1,2]", "retriever.max_block_tokens=160", "train.batch_size=2",
              f"cache_dir={tmp_path / 'cache'}"]
    trainable = {}
    for retriever in ("bm25", tiny_retriever):
        assert bench.main(["--steps", "1", "--warmup", "0", "--eval-questions", "2",
                           "--latency-questions", "1", "--modes", "greedy", "--no-bf16",
                           "--retriever", retriever, *common]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(out["train"]) == {"fp32"} and set(out["decoding"]) == {"greedy"}
        assert set(out["decoding"]["greedy"]) == {"fp32"}
        assert out["answer_latency"]["precision"] == "fp32"
        trainable[retriever] = out["train"]["fp32"]["trainable_params"]
    assert out["retriever_dir"] == tiny_retriever
    assert trainable[tiny_retriever] > trainable["bm25"] > 0  # + the query encoder
