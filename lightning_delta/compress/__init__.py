"""An edited delta stored at the size it costs, loaded back exactly, many held on one base (beyond the paper).

* :func:`save_compressed` writes ``F(ΔW)`` of an edit or a plan, each tensor in its family's compact form
  (:mod:`lightning_delta.compress.forms`): BitDelta's sign bits and magnitudes, DARE's and TIES' kept entries, the
  low-rank factors (and a PEFT LoRA adapter of them), the dense ``F(ΔW)`` for the rest. Safetensors only.
* :func:`load_compressed` gives ``W_pre + F(ΔW)`` bit for bit equal to what
  :func:`~lightning_delta.export.save_edited` writes.
* :func:`apply_compressed_` and :func:`remove_compressed_` swap fine-tunes on one loaded base in place.
"""

from lightning_delta.compress.load import (
    CompressedDelta,
    apply_compressed_,
    load_compressed,
    read_header,
    remove_compressed_,
)
from lightning_delta.compress.save import FORMAT, HEADER_FILE, VERSION, save_compressed

__all__ = [
    "FORMAT",
    "HEADER_FILE",
    "VERSION",
    "CompressedDelta",
    "apply_compressed_",
    "load_compressed",
    "read_header",
    "remove_compressed_",
    "save_compressed",
]
