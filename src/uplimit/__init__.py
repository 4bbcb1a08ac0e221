"""uplimit: serve a strong language model through a narrow, metered upload link."""

__version__ = "0.1.0"
