"""The public API: every exported name resolves, and the edits load without Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_delta


def test_every_exported_name_resolves():
    for name in lightning_delta.__all__:
        assert getattr(lightning_delta, name) is not None, name
    assert lightning_delta.compute_delta.__module__ == "lightning_delta.delta"
    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_delta.no_such_name  # noqa: B018


def test_edits_import_without_lightning_and_dpo_is_always_registered():
    code = (
        "import sys, lightning_delta.edits\n"
        "assert 'lightning' not in sys.modules, 'edits pulled in Lightning'\n"
        "from lightning_delta.losses import available_losses\n"
        "assert 'dpo' in available_losses(), available_losses()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
