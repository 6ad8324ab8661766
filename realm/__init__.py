"""realm: REALM-style retrieval-augmented language-model pretraining."""

__version__ = "0.1.0"


def __getattr__(name):  # ``from realm import OpenQA`` without importing torch for ``import realm``
    if name == "OpenQA":
        from realm.qa import OpenQA

        return OpenQA
    raise AttributeError(f"module 'realm' has no attribute {name!r}")
