"""The README's commands are the ones that work: set-up matches .ci/run, the main job runs."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
    assert installs == ["pip install torch==2.13.0", 'pip install -e ".[cpu,test]"']
    assert [line.strip() for line in ci if line.strip().startswith("pip install")] == installs
    assert "pytest" in commands and "pytest" in [line.strip() for line in ci]


def test_readme_main_job_runs(tmp_path):
    (job,) = [c for c in _quickstart_commands() if c.startswith("python launch/")]
    argv = shlex.split(job)
    argv[argv.index("--output") + 1] = str(tmp_path / "leads")
    argv += ["data.max_articles=150", "spans.n_process=1", "--no-progress"]  # a slice, for time
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["articles"] == 150 and summary["blocks"] >= 150 and summary["spans"] > 500
    config = (tmp_path / "leads" / "config.yaml").read_text()
    assert "package:wiki-leads" in config and "max_articles: 150" in config


def test_configuration_reference_is_current():
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert reference_markdown() in doc, "regenerate the table: python -m realm.config"
