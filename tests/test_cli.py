"""Every launch script answers --help without importing torch; every config-driven stage
prints its resolved config with --print-config and exits without running."""

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
