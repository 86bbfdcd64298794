"""The package version, in a module of its own so that any module can read it without importing
the package (``fxswap/__init__.py`` imports tooling lazily; the graph cache keys on the version)."""

__version__ = "0.1.0"
