"""The package version (one place; read by the CLI, the manifest and pyproject)."""

__version__ = "0.1.0"
