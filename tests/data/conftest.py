"""Block stores over the shared test corpora (tests/conftest.py builds them once a session)."""

import pytest

from realm.data.store import BlockStore


@pytest.fixture(scope="session")
def spans_store(spans_corpus):
    return BlockStore(spans_corpus)


@pytest.fixture(scope="session")
def leads_store(leads_corpus):
    return BlockStore(leads_corpus)
