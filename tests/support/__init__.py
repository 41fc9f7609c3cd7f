"""Helpers of the tests: tiny models, data files in the real formats, brute-force references, and the scripts that
the multi-process tests start as real processes (``python tests/support/<script>.py``)."""
