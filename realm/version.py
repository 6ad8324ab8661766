"""The package version (a base file: every layer may read it without importing ``realm``'s API)."""

__version__ = "0.1.0"
