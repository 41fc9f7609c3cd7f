"""Per-process memory of one Riemann sweep unsharded (1 process) and sharded by FSDP2 on 1 and 2 CPU processes.

``python -m benchmarks.sharded [--size medium] [--points 5]`` runs, each in fresh processes:

- ``unsharded``: one process, strategy ``auto`` (the parametrization path);
- ``fsdp × 1`` and ``fsdp × 2``: ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``, the
  model sharded by :meth:`DeltaEditModule.configure_model`, gloo on CPU.

For every process it reports the bytes of the sharded state it holds once the edit is attached (the edited
weights' rows W(t), the copy of W_post's rows, E's rows: exact, from the tensors) and the peak resident memory
during the sweep (Linux ``VmHWM``, reset at validation start, so loading the whole model before ``fully_shard``
is not in it), beside the term, which must agree. W_pre is read from a safetensors file, as from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, MiB, peak_rss_bytes, reset_peak_rss, rss_bytes


def process_main(out: str, devices: int, mode: str, size: str, pretrained: str, points: int) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from benchmarks.riemann import MODEL_SIZES, _split_rows, build_batches, build_model
    from lightning_delta.callbacks import RiemannCallback
    from lightning_delta.edits import DARE
    from lightning_delta.module import DeltaEditModule
    from lightning_delta.sharded import ShardedEditedModel

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    model = build_model(size, torch.float32)
    rows = [row for batch in build_batches(MODEL_SIZES[size]["vocab_size"], 4, 64, 1) for row in _split_rows(batch)]

    class Data(pl.LightningDataModule):
        def val_dataloader(self) -> DataLoader:
            sampler = None
            if self.trainer.world_size > 1:
                sampler = UnrepeatedDistributedSampler(
                    rows, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
                )
            return DataLoader(rows, batch_size=2, sampler=sampler)

    class Memory(pl.Callback):
        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.rss_start = rss_bytes()
            reset_peak_rss()

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            edited = riemann._edited
            if batch_idx == 0 and edited is not None:
                self.state = state_bytes(edited)

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.peak = peak_rss_bytes()

    def state_bytes(edited) -> dict[str, int]:
        if isinstance(edited, ShardedEditedModel):
            weights = sum(p.to_local().numel() * p.element_size() for p in edited._parameters.values())
            post = sum(t.numel() * t.element_size() for t in edited._post.values())
        else:
            weights = sum(edited.original(name).numel() * edited.original(name).element_size() for name in edited.names)
            post = 0  # the parametrization reads W_post itself
        E = sum(edited.E(name).numel() * edited.E(name).element_size() for name in edited.names)  # noqa: N806
        return {"weights": weights, "post_copy": post, "E": E}

    riemann, memory = RiemannCallback(num_points=points, filename=None), Memory()
    strategy = (
        "auto" if mode == "unsharded" else ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        inference_mode=False,
        use_distributed_sampler=False,
        callbacks=[memory, riemann],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(
        DeltaEditModule(model, pretrained=pretrained, edit=DARE(p=0.5, seed=1)), datamodule=Data(), verbose=False
    )
    record = {
        "rank": trainer.global_rank,
        "state": memory.state,
        "rss_start": memory.rss_start,
        "peak_sweep": memory.peak,
        "term": riemann.result.term,
        "exact": riemann.result.exact,
    }
    Path(f"{out}.rank{trainer.global_rank}").write_text(json.dumps(record))


def write_pretrained(size: str, path: Path) -> None:
    """W_pre = W_post − a small random delta, as one safetensors file."""
    import torch
    from safetensors.torch import save_file

    from benchmarks.riemann import build_edits, build_model

    model = build_model(size, torch.float32)
    deltas = build_edits(model, scale=0.002)
    save_file({name: (p.detach() - deltas[name]).contiguous() for name, p in model.named_parameters()}, str(path))


def run(mode: str, devices: int, size: str, pretrained: Path, points: int, directory: Path) -> list[dict[str, Any]]:
    out = directory / f"{mode}-{devices}"
    command = [
        sys.executable,
        "-m",
        "benchmarks.sharded",
        "--process",
        str(out),
        str(devices),
        mode,
        size,
        str(pretrained),
        str(points),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if finished.returncode != 0:
        raise RuntimeError(f"{mode} on {devices} process(es) failed:\n{finished.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(devices)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--points", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pretrained = Path(directory) / "pre.safetensors"
        write_pretrained(args.size, pretrained)
        runs = [("unsharded", 1), ("fsdp", 1), ("fsdp", 2)]
        records = {
            (mode, devices): run(mode, devices, args.size, pretrained, args.points, Path(directory))
            for mode, devices in runs
        }
    reference = records[("unsharded", 1)][0]["term"]
    print(f"Llama {args.size}, float32, C = {args.points}, DARE p = 0.5; MiB per process")
    print(
        "| run | rank | edited weights (rows) | W_post copy | E (rows) | sharded state | peak RSS in sweep | "
        "term rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (mode, devices), ranks in records.items():
        for record in ranks:
            state = record["state"]
            total = sum(state.values())
            difference = abs(record["term"] - reference) / abs(reference)
            print(
                f"| {mode} × {devices} | {record['rank']} | {state['weights'] / MiB:.0f} | "
                f"{state['post_copy'] / MiB:.0f} | {state['E'] / MiB:.0f} | {total / MiB:.0f} | "
                f"{record['peak_sweep'] / MiB:.0f} | {difference:.1e} |"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--process":
        process_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]))
    else:
        main()
