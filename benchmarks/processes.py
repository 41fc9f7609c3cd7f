"""One Riemann sweep under ``trainer.validate`` with RiemannCallback on 1 and on 2 CPU processes (DDP).

Run as ``python -m benchmarks.processes OUT DEVICES SIZE SEQUENCES SEQ_LEN BATCH POINTS``: rank 0 writes the
result (per-tensor terms, term, exact ΔL), the time spent in ``trainer.validate`` (which, on 2 processes, includes
waiting for the second process to start, import and build its model) and the sweep's own time (validation start to
end, after set-up and the weight broadcast) to ``OUT`` as JSON. The
two processes share the machine's cores (``torch`` threads = cores / processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import ROOT


def main() -> None:
    out, devices, size = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sequences, seq_len, batch, points = (int(value) for value in sys.argv[4:8])

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data import DataLoader

    from benchmarks.riemann import MODEL_SIZES, _split_rows, build_batches, build_edits, build_model
    from lightning_delta.callbacks import RiemannCallback
    from lightning_delta.module import DeltaEditModule

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    model = build_model(size, torch.float32)
    edits = build_edits(model)
    rows = [
        row for b in build_batches(MODEL_SIZES[size]["vocab_size"], sequences, seq_len, 1) for row in _split_rows(b)
    ]

    class Data(pl.LightningDataModule):
        def val_dataloader(self) -> DataLoader:
            sampler = None
            if self.trainer.world_size > 1:
                sampler = UnrepeatedDistributedSampler(
                    rows, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
                )
            return DataLoader(rows, batch_size=batch, sampler=sampler)

    class SweepClock(pl.Callback):
        """The sweep alone: from validation start (every rank set up, weights broadcast) to validation end."""

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.strategy.barrier()
            self.start = time.perf_counter()

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.strategy.barrier()
            self.elapsed = time.perf_counter() - self.start

    callback, clock = RiemannCallback(num_points=points, filename=None), SweepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        inference_mode=False,
        use_distributed_sampler=False,
        callbacks=[clock, callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.validate(DeltaEditModule(model, pretrained=None, edit=edits), datamodule=Data(), verbose=False)
    elapsed = time.perf_counter() - start
    if trainer.is_global_zero:
        result = callback.result
        record = {
            "validate_s": elapsed,
            "sweep_s": clock.elapsed,
            "devices": devices,
            "threads": torch.get_num_threads(),
            "term": result.term,
            "exact": result.exact,
            "per_tensor": result.term_per_tensor,
        }
        with open(out, "w") as handle:
            json.dump(record, handle)


def run(
    out: str, devices: int, size: str, sequences: int, seq_len: int, batch: int, points: int, timeout: float
) -> dict[str, Any]:
    """Start :func:`main` in a fresh process and return rank 0's record plus the whole wall time."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.processes",
        out,
        str(devices),
        size,
        str(sequences),
        str(seq_len),
        str(batch),
        str(points),
    ]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if completed.returncode != 0 or not os.path.exists(out):
        tail = " | ".join(completed.stderr.strip().splitlines()[-4:])
        return {"error": f"exit code {completed.returncode}: {tail}"}
    with open(out) as handle:
        record = json.load(handle)
    os.remove(out)
    record["wall_s"] = wall
    return record


if __name__ == "__main__":
    main()
