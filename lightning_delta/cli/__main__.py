"""``python -m lightning_delta.cli``: the ``lightning-delta`` console script."""

from lightning_delta.cli import main

main()
