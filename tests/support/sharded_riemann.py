"""One Riemann sweep of a tiny Llama, unsharded or sharded by FSDP2 under ModelParallelStrategy; started as real
processes by ``tests/test_sharded.py``.

Usage: python tests/support/sharded_riemann.py OUT DEVICES CASE [CASE ...],
each CASE ``<delta|own|ownsum>-<untied|tied>-<edit>``
with edit ``random`` (ready-made E), ``dare``, ``bitdelta`` or ``gradient`` (GradientBiased); float64 throughout.
An edit ending in ``file`` (``darefile``, ``bitdeltafile``) reads W_pre from a safetensors file, and each rank writes
the reads of that file, ``[name, start, stop]`` for rows and ``[name]`` for whole tensors, to ``OUT.CASE.reads<rank>``.

``DEVICES`` 1 runs one unsharded process (strategy ``auto``); 2 runs two CPU processes (gloo) under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``2ddp`` two unsharded DDP processes. ``own`` sweeps a LightningModule of the
user's own (its ``configure_model`` calls ``fully_shard``) through ``RiemannCallback(pretrained=, edit=)`` with the
default loss (its ``training_step``, a batch mean weighted by the batch size, which depends on how rows are batched);
``ownsum`` the same with a ``loss_fn`` of token sums; ``delta`` a ``DeltaEditModule``, which shards itself. Each rank writes ``callback.result`` to ``OUT.CASE.rank<rank>`` and, at
teardown, the whole W its model holds (gathered) to ``OUT.CASE.weights<rank>`` (safetensors), so that a test can
check that the model came back to W_post.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_delta.callbacks import RiemannCallback  # noqa: E402
from lightning_delta.edits import DARE, BitDelta, GradientBiased  # noqa: E402
from lightning_delta.losses import CausalLMLoss  # noqa: E402
from lightning_delta.module import DeltaEditModule  # noqa: E402
from lightning_delta.sources import SafetensorsSource  # noqa: E402
from tests.support.distributed_riemann import TokenData  # noqa: E402
from tests.support.riemann_support import random_edits, tiny_llama  # noqa: E402


class OwnModule(pl.LightningModule):
    """A user's module: its own ``training_step`` loss and its own FSDP2 sharding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = CausalLMLoss()

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        output = self.loss(self.model, self.loss.prepare(batch))
        return output.total / output.count


class SaveResult(pl.Callback):
    """Writes the callback's result, and after validation the whole W the model holds (gathered), whether it was
    sharded and its ``requires_grad`` flags."""

    def __init__(self, riemann: RiemannCallback, out: str, model: torch.nn.Module) -> None:
        self.riemann, self.out, self.model = riemann, out, model

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.riemann.result.save(f"{self.out}.rank{trainer.global_rank}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        parameters = dict(self.model.named_parameters())
        weights = {
            name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
            for name, p in parameters.items()
        }
        weights["__sharded__"] = torch.tensor([isinstance(parameters[name], DTensor) for name in sorted(parameters)])
        weights["__requires_grad__"] = torch.tensor([parameters[name].requires_grad for name in sorted(parameters)])
        save_file(weights, f"{self.out}.weights{trainer.global_rank}")


def edit_of(kind: str, model: torch.nn.Module, tied: bool, out: str):
    """``(W_pre, edit)``: random ready-made ``E`` tensors, or an operation on a second tiny Llama's weights."""
    if kind == "random":
        return {}, random_edits(model, scale=0.05)
    pretrained = tiny_llama(seed=7, dtype=next(model.parameters()).dtype, tie=tied).state_dict()
    if tied:  # W_pre under one name of the tied tensor
        pretrained.pop("lm_head.weight")
    edits = {"dare": DARE(p=0.5, seed=3), "bitdelta": BitDelta(), "gradient": GradientBiased(p=0.5, k=0.5)}
    if kind.endswith("file"):
        path = f"{out}.pre{os.environ.get('LOCAL_RANK', '0')}.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in pretrained.items()}, path)
        return path, edits[kind.removesuffix("file")]
    return pretrained, edits[kind]


READS: list[list] = []


def record_reads() -> None:
    """Records every read of a safetensors file (rows or whole tensors) in READS."""
    whole, rows = SafetensorsSource._get, SafetensorsSource._rows

    def get(self, name):
        READS.append([name])
        return whole(self, name)

    def get_rows(self, name, start, stop):
        READS.append([name, start, stop])
        return rows(self, name, start, stop)

    SafetensorsSource._get, SafetensorsSource._rows = get, get_rows


def token_sums(module: OwnModule, batch, batch_idx: int):
    """The summed token loss and token count: unlike a batch mean, independent of how the rows are batched."""
    return module.loss(module.model, module.loss.prepare(batch))


def sweep(out: str, devices: int, case: str, ddp: bool = False) -> None:
    """``case`` is ``<delta|own|ownsum>-<untied|tied>-<edit>[-<batch size, default 4>]``."""
    kind, tying, edit_name, *batch_size = case.split("-")
    model = tiny_llama(dtype=torch.float64, tie=tying == "tied")
    pretrained, edit = edit_of(edit_name, model, tying == "tied", f"{out}.{case}")
    READS.clear()
    if kind in ("own", "ownsum"):
        module = OwnModule(model)
        loss_fn = token_sums if kind == "ownsum" else None
        callback = RiemannCallback(
            num_points=5, filename=None, pretrained=pretrained, edit=edit, module_name="model", loss_fn=loss_fn
        )
    else:
        module = DeltaEditModule(model, pretrained=pretrained, edit=edit)
        callback = RiemannCallback(num_points=5, filename=None)
    if devices == 1:
        strategy = "auto"
    elif ddp:
        strategy = "ddp"
    else:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        inference_mode=False,
        use_distributed_sampler=False,
        callbacks=[callback, SaveResult(callback, f"{out}.{case}", model)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = TokenData(int(batch_size[0]) if batch_size else 4)
    if kind != "delta":
        callback.validate(trainer, module, datamodule=data, verbose=False)
    else:
        trainer.validate(module, datamodule=data, verbose=False)
    if edit_name.endswith("file"):
        Path(f"{out}.{case}.reads{trainer.global_rank}").write_text(json.dumps(READS))


def main() -> None:
    out, devices, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    record_reads()
    for case in cases:
        sweep(out, int(devices.removesuffix("ddp")), case, ddp=devices.endswith("ddp"))


if __name__ == "__main__":
    main()
