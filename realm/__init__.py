"""realm: REALM-style retrieval-augmented language-model pretraining."""

__version__ = "0.1.0"
