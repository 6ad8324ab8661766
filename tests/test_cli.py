"""Every launch script answers --help without importing torch; every config-driven stage
prints its resolved config with --print-config and exits without running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "launch").glob("*.py"))
STAGES = ["pretrain.py", "ict.py", "adapt_mlm.py", "train_retriever.py", "finetune_openqa.py",
          "prepare_corpus.py", "refresh_index.py"]

_PROBE = """
import runpy, sys
sys.argv = [{script!r}, *{args!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("RESULT", code, "torch" in sys.modules)
"""


def _probe(script, *args):
    done = subprocess.run([sys.executable, "-c", _PROBE.format(
        script=str(REPO / "launch" / script), args=list(args))], capture_output=True, text=True,
        timeout=120)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")][-1]
    return done.stdout, line.split()[1:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    out, (code, torch_loaded) = _probe(script, "--help")
    assert code in ("0", "None") and "usage:" in out
    assert torch_loaded == "False", f"{script} --help imported torch"


@pytest.mark.parametrize("script", STAGES)
def test_print_config_shows_the_resolved_config_and_runs_nothing(script, tmp_path):
    extra = ["--output", str(tmp_path / "never")] if script == "prepare_corpus.py" else []
    extra += ["--run-dir", str(tmp_path / "never")] if script == "refresh_index.py" else []
    out, (code, torch_loaded) = _probe(script, "--print-config", *extra, "seed=7",
                                       "train.steps=3")
    assert code in ("0", "None") and torch_loaded == "False"
    config = yaml.safe_load(out[:out.index("RESULT")])
    assert config["seed"] == 7 and config["train"]["steps"] == 3
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("script", [s for s in STAGES if s != "prepare_corpus.py"])
def test_corpus_flag_sets_the_top_level_corpus(script, tmp_path):
    extra = ["--run-dir", str(tmp_path / "never")] if script == "refresh_index.py" else []
    out, (code, _) = _probe(script, "--print-config", *extra, "--corpus", str(tmp_path / "c"))
    assert code in ("0", "None")
    assert yaml.safe_load(out[:out.index("RESULT")])["corpus"] == str(tmp_path / "c")


BAD_INPUTS = [  # (script, arguments, exit code, what the one line must name)
    ("pretrain.py", ["corpus={tmp}/no-corpus", "train.run_dir={tmp}/run"], 1,
     "{tmp}/no-corpus: not a corpus directory"),
    ("ict.py", ["--corpus", "{tmp}/bad-corpus", "train.run_dir={tmp}/run"], 1,
     "{tmp}/bad-corpus/manifest.json: unreadable manifest"),
    ("refresh_index.py", ["--run-dir", "{tmp}/run", "--corpus", "{tmp}/no-corpus", "--once"], 1,
     "{tmp}/no-corpus: not a corpus directory"),
    ("evaluate.py", ["retrieval", "--retriever", "{tmp}/no-retriever", "--corpus", "{tmp}",
                     "--qa", "{tmp}/qa.jsonl"], 2, "--retriever: {tmp}/no-retriever: no such"),
    ("evaluate.py", ["retrieval", "--bm25", "--limit", "0", "--corpus", "{tmp}", "--qa", "q"], 2,
     "--limit: at least 1"),
    ("prepare_corpus.py", ["--output", "{tmp}/a-file/corpus", "--input", "{tmp}/leads.jsonl"], 1,
     "File exists: '{tmp}/a-file'"),
    # a URL run directory is refused, never written as a local ./memory:/x
    ("pretrain.py", ["train.run_dir=memory://x"], 2, "train.run_dir: 'memory://x' is a URL"),
    ("pretrain.py", ["refresh.devices=[cuda:99]", "train.run_dir={tmp}/run"], 2,
     "refresh.devices: cuda:99 does not exist"),
    ("refresh_index.py", ["--run-dir", "nofs://bucket/run", "--corpus", "{tmp}/no-corpus"], 1,
     "nofs://bucket/run: no fsspec file system for the scheme 'nofs'"),
    # a factory faiss cannot parse: before any preparation, not after three refresher restarts
    ("pretrain.py", ["index.factory=Bogus", "train.run_dir={tmp}/run"], 2,
     "index.factory='Bogus' is not a faiss factory string"),
    ("refresh_index.py", ["--run-dir", "{tmp}/run", "--corpus", "{tmp}/no-corpus",
                          "index.factory=Bogus"], 2, "index.factory='Bogus'"),
]


@pytest.mark.parametrize("script,args,code,names", BAD_INPUTS,
                         ids=[f"{s}-{i}" for i, (s, *_) in enumerate(BAD_INPUTS)])
@pytest.mark.slow
def test_bad_inputs_get_one_line_naming_the_path(script, args, code, names, tmp_path,
                                                 shared_data):
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        (tmp_path / "leads.jsonl").write_text(next(f) + next(f), encoding="utf-8")
    (tmp_path / "bad-corpus").mkdir()
    (tmp_path / "bad-corpus" / "manifest.json").write_text('{"kind":')
    (tmp_path / "a-file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in args]
    extra = [] if script == "evaluate.py" else ["--no-progress"]
    done = subprocess.run([sys.executable, str(REPO / "launch" / script), *argv, *extra],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and names.format(tmp=tmp_path) in errors[0], done.stderr[-2000:]
    assert not any(p.name.startswith(("memory:", "nofs:")) for p in tmp_path.iterdir())


def test_ctrl_c_and_sigterm_take_the_interrupt_path():
    """Ctrl-C exits 130, a scheduler's SIGTERM 143, both through KeyboardInterrupt (the path that
    checkpoints: tests/training/test_pretrain_run.py runs it end to end with SIGTERM)."""
    import signal
    import time

    from realm.cli import run_stage

    def interrupted(config, progress):
        raise KeyboardInterrupt

    def terminated(config, progress):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the stage")

    assert run_stage("a stage", interrupted, argv=[]) == 130
    t0 = time.monotonic()
    assert run_stage("a stage", terminated, argv=[]) == 143
    assert time.monotonic() - t0 < 10
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_the_summary_line_names_paths_under_the_working_directory_relatively(tmp_path, capsys,
                                                                             monkeypatch):
    from realm.cli import emit_summary

    monkeypatch.chdir(tmp_path)
    emit_summary({"run_dir": str(tmp_path / "runs" / "a"), "elsewhere": "/opt/x", "n": 3,
                  "dev": {"predictions": str(tmp_path / "p.jsonl")}, "cwd": str(tmp_path),
                  "list": [str(tmp_path / "b"), "c"], "sibling": str(tmp_path) + "-other/x"})
    line = json.loads(capsys.readouterr().out)
    assert line == {"run_dir": "runs/a", "elsewhere": "/opt/x", "n": 3,
                    "dev": {"predictions": "p.jsonl"}, "cwd": str(tmp_path), "list": ["b", "c"],
                    "sibling": str(tmp_path) + "-other/x"}


def test_a_finished_stage_keeps_its_summary_in_its_run_directory(tmp_path, capsys):
    from realm.cli import run_stage
    from realm.report.records import read_summary

    def stage(config, progress):
        os.makedirs(config.train.run_dir)
        return {"stage": "a stage", "run_dir": config.train.run_dir, "ru_last_quarter": 0.25}

    run_dir = tmp_path / "run"
    assert run_stage("a stage", stage, argv=[f"train.run_dir={run_dir}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert read_summary(str(run_dir)) == {"stage": "a stage", "run_dir": str(run_dir),
                                          "ru_last_quarter": 0.25}
    assert printed["ru_last_quarter"] == 0.25
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]  # no temp left
