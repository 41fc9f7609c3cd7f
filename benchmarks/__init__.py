"""Speed and memory benchmarks of lightning_delta: run ``python -m benchmarks`` (see ``benchmarks/__main__.py``)."""
