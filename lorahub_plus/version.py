"""The package version (one place: the root package and what writes artefacts read it here)."""
__version__ = "0.1.0"
