"""Fuzzers of the project's inputs (run with ``python -m fuzz.<name>``)."""
