"""Test-wide settings: nothing reaches a hub, wandb stays offline and inside a temp dir."""

import os
import tempfile
from pathlib import Path

import pytest

_WANDB_TMP = tempfile.mkdtemp(prefix="realm-tests-wandb-")
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _WANDB_TMP,
    "WANDB_CACHE_DIR": os.path.join(_WANDB_TMP, "cache"),
    "WANDB_DATA_DIR": os.path.join(_WANDB_TMP, "data"),
    "WANDB_CONFIG_DIR": os.path.join(_WANDB_TMP, "config"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_key] = _value

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real third-party data; read, never copied)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA
