"""A small real corpus of Wikipedia lead sections for the training tests."""

import pytest

from realm.config import DataConfig, SpansConfig
from realm.data.build import build_corpus


@pytest.fixture(scope="session")
def leads_corpus(shared_data, tmp_path_factory):
    """300 lead sections (real text), blocks of at most 128 word pieces, no spans (not needed)."""
    tmp = tmp_path_factory.mktemp("leads")
    src = tmp / "leads.jsonl"
    with open(shared_data / "wikipedia" / "vital_level4_summaries_en.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    src.write_text("".join(lines), encoding="utf-8")
    build_corpus(DataConfig(input=str(src), max_block_tokens=128), SpansConfig(enabled=False),
                 str(tmp / "corpus"), progress=False)
    return str(tmp / "corpus")
