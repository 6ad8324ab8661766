"""realm: REALM-style retrieval-augmented language-model pretraining."""

from realm.version import __version__

__all__ = ["OpenQA", "Searcher", "__version__"]


def __getattr__(name):  # ``from realm import OpenQA`` without importing torch for ``import realm``
    if name == "OpenQA":
        from realm.qa import OpenQA

        return OpenQA
    if name == "Searcher":
        from realm.retrieval.search import Searcher

        return Searcher
    raise AttributeError(f"module 'realm' has no attribute {name!r}")
