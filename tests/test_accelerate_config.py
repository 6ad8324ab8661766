"""The shipped accelerate config starts a stage with no defaults warning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_shipped_accelerate_config_starts_without_the_defaults_warning(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}  # no user config
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    bare = subprocess.run([*launcher, "-m", "realm", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    shipped = subprocess.run([*launcher, "--config_file",
                              str(REPO / "configs" / "accelerate" / "default.yaml"),
                              "-m", "realm", "--help"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
    assert bare.returncode == 0 and "had defaults used instead" in bare.stderr  # what it fixes
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert "stages:" in shipped.stdout and "pretrain" in shipped.stdout
    assert "defaults used" not in shipped.stderr and "warning" not in shipped.stderr.lower()
