"""The package version, in a module of its own (the CLI and the run records read it without importing the rest)."""

__version__ = "0.1.0"
