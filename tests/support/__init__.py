"""Helpers shared by the test suite (on pytest's path via `pythonpath` in pyproject.toml)."""
