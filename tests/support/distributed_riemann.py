"""Run one Riemann sweep on a tiny Llama and write the result as JSON; started as real processes by the tests.

Usage: python tests/support/distributed_riemann.py OUT STRATEGY DEVICES NUM_NODES [BATCH_SIZE] [DTYPE] [DATA]
Each rank writes its ``callback.result`` to ``OUT.rank<global rank>``. DATA is ``tokens`` (random token rows) or
``gsm8k`` (GSM8KDataModule on a 7-row jsonl fixture written next to OUT, with its own sampler and Lightning's
default ``use_distributed_sampler=True``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_delta.callbacks import RiemannCallback  # noqa: E402
from lightning_delta.module import DeltaEditModule  # noqa: E402
from tests.support.riemann_support import random_edits, tiny_llama, token_dataset  # noqa: E402


class TokenData(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def val_dataloader(self) -> DataLoader:
        dataset = token_dataset(37)  # 37 rows: divisible by neither 2 processes nor the batch size
        sampler = None
        if self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class SaveResult(pl.Callback):
    """Writes the RiemannCallback's result as each rank sees it (workers under ddp_spawn never return)."""

    def __init__(self, riemann: RiemannCallback, out: str) -> None:
        self.riemann, self.out = riemann, out

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.riemann.result.save(f"{self.out}.rank{trainer.global_rank}")


def gsm8k(out: str, batch_size: int, dtype: torch.dtype) -> tuple[torch.nn.Module, pl.LightningDataModule]:
    from lightning_delta.datamodules import GSM8KDataModule
    from tests.support.datamodule_fixtures import GSM8K_ROWS, write_gsm8k
    from tests.support.tiny_models import make_tiny_model, make_tiny_tokenizer

    rows = [GSM8K_ROWS[i % len(GSM8K_ROWS)] for i in range(7)]  # 7 rows: divisible by neither 2 nor the batch
    data = write_gsm8k(Path(f"{out}.data"), test_rows=rows)
    return make_tiny_model("llama", dtype=dtype), GSM8KDataModule(
        make_tiny_tokenizer(), data=str(data), batch_size=batch_size
    )


def main() -> None:
    out, strategy, devices, num_nodes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    batch_size = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float64
    data = sys.argv[7] if len(sys.argv) > 7 else "tokens"
    torch.set_num_threads(1)
    if data == "gsm8k":
        model, datamodule = gsm8k(out, batch_size, dtype)
    else:
        model, datamodule = tiny_llama(dtype=dtype), TokenData(batch_size)
    edits = random_edits(model, scale=0.05)
    callback = RiemannCallback(num_points=5, filename=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        inference_mode=False,
        use_distributed_sampler=data == "gsm8k",
        callbacks=[callback, SaveResult(callback, out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(DeltaEditModule(model, pretrained=None, edit=edits), datamodule=datamodule, verbose=False)


if __name__ == "__main__":
    main()
