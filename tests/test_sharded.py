"""FSDP2 (Lightning's ModelParallelStrategy, gloo, 2 CPU processes) gives the numbers of one unsharded process.

Every run is a set of real processes on ``tests/support/sharded_riemann.py`` (float64, 37 token rows in batches of 4,
one thread per process). The sharded runs must match one process to 1e-6 relative (they agree to about 1e-13): term,
trapezoid, exact ΔL, losses and every per-tensor term, and the model must hold W_post again afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.riemann_support import tiny_llama
from tests.test_distributed import ROOT, assert_same, environment

SCRIPT = Path(__file__).parent / "support" / "sharded_riemann.py"
# A DeltaEditModule (which shards itself) with ready-made E, DARE on a tied model, BitDelta (a whole-tensor mean),
# GradientBiased (∇L at W_post from the reduce-scattered gradients), and a user's module with a token-sum loss.
CASES = ("delta-untied-random", "delta-tied-dare", "delta-untied-bitdelta", "delta-untied-gradient", "ownsum-tied-dare")
# W_pre read from a safetensors file: each process must read only its rows of it.
FILE_CASES = ("delta-untied-darefile", "delta-tied-bitdeltafile")
# A user's module with its default training_step loss (a batch mean × batch size): compared with DDP on the same
# two processes, since its value depends on how the rows are batched.
OWN_DEFAULT = "own-untied-dare"


def run(out: Path, devices: str, *cases: str) -> None:
    command = [sys.executable, str(SCRIPT), str(out), devices, *cases]
    result = subprocess.run(command, env=environment(), cwd=ROOT, timeout=400, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def result(out: Path, case: str, rank: int) -> dict:
    return json.loads(Path(f"{out}.{case}.rank{rank}").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    outs = {"single": root / "single", "fsdp": root / "fsdp", "ddp": root / "ddp"}
    run(outs["single"], "1", *CASES, *FILE_CASES)
    run(outs["fsdp"], "2", *CASES, *FILE_CASES, OWN_DEFAULT)
    run(outs["ddp"], "2ddp", OWN_DEFAULT)
    return outs


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES + FILE_CASES)
def test_sharded_two_processes_equal_one_unsharded_process(runs, case):
    single = result(runs["single"], case, 0)
    assert single["count"] > 0 and single["term"] != 0.0
    for rank in (0, 1):
        assert_same(result(runs["fsdp"], case, rank), single, rel=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("case", FILE_CASES)
def test_each_process_reads_only_its_rows_of_w_pre(runs, case):
    model = tiny_llama(dtype=torch.float64, tie="-tied-" in case)
    rows = {name: parameter.shape[0] for name, parameter in model.named_parameters()}
    single = json.loads(Path(f"{runs['single']}.{case}.reads0").read_text())
    assert sorted(read[0] for read in single) == sorted(rows)  # one process reads each tensor whole, once
    assert all(len(read) == 1 for read in single)
    covered: dict[str, list[tuple[int, int]]] = {}
    for rank in (0, 1):
        reads = json.loads(Path(f"{runs['fsdp']}.{case}.reads{rank}").read_text())
        assert sorted(read[0] for read in reads) == sorted(rows) and all(len(read) == 3 for read in reads), reads
        for name, start, stop in reads:
            half = -(-rows[name] // 2)
            assert (start, stop) == ((0, half) if rank == 0 else (half, rows[name])), (name, start, stop)
            covered.setdefault(name, []).append((start, stop))
    assert all(sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == rows[name] for name, ranges in covered.items())


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES + FILE_CASES + (OWN_DEFAULT,))
def test_the_sharded_model_holds_w_post_again(runs, case):
    reference = dict(tiny_llama(dtype=torch.float64, tie="-tied-" in case).named_parameters())
    for rank in (0, 1):
        weights = load_file(f"{runs['fsdp']}.{case}.weights{rank}")
        assert bool(weights.pop("__sharded__").all()), "the run did not shard the model"
        requires_grad = weights.pop("__requires_grad__")
        assert weights.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(weights[name], value), name
        if not case.startswith("delta"):  # a user's module is given back trainable as it was
            assert bool(requires_grad.all())


@pytest.mark.distributed
def test_users_module_with_its_default_loss_sharded_equals_ddp(runs):
    ddp = result(runs["ddp"], OWN_DEFAULT, 0)
    for rank in (0, 1):
        assert_same(result(runs["fsdp"], OWN_DEFAULT, rank), ddp, rel=1e-6)


@pytest.mark.distributed
def test_processes_with_different_batch_counts_are_refused_with_the_batch_sizes_that_fit(tmp_path):
    """37 rows in batches of 3 on 2 processes: 19 and 18 rows, 7 and 6 batches; FSDP would wait forever."""
    command = [sys.executable, str(SCRIPT), str(tmp_path / "out"), "2", "delta-untied-random-3"]
    finished = subprocess.run(command, env=environment(), cwd=ROOT, timeout=400, capture_output=True, text=True)
    assert finished.returncode != 0
    assert "same number of validation batches" in finished.stderr
    assert "[19, 18] rows" in finished.stderr and "[7, 6] batches of 3" in finished.stderr
    assert "(4, 5, 7 would)" in finished.stderr  # ceil(19/b) == ceil(18/b) for b = 4, 5, 7 near 3


def apply_edit_sharded(rank: int, init_file: str, pre_path: str, out: str) -> None:
    """apply_edit_ on a tiny Llama sharded by fully_shard over 2 gloo processes; the whole edited W to ``out``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_delta import apply_edit_
    from lightning_delta.edits import DARE

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = tiny_llama(dtype=torch.float64)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        apply_edit_(model, pretrained=pre_path, edit=DARE(p=0.5, seed=3))
        weights = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(weights, out)
        # both processes leave together: a rank that tears gloo down while its peer still sends aborts the peer
        # ("terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_apply_edit_on_a_sharded_model_writes_each_process_rows_as_one_process_does(tmp_path):
    from safetensors.torch import save_file

    from lightning_delta import apply_edit_
    from lightning_delta.edits import DARE

    pre_path = str(tmp_path / "pre.safetensors")
    save_file({name: t.contiguous() for name, t in tiny_llama(seed=7).state_dict().items()}, pre_path)
    torch.multiprocessing.spawn(
        apply_edit_sharded, args=(str(tmp_path / "init"), pre_path, str(tmp_path / "w.pt")), nprocs=2
    )
    sharded = torch.load(tmp_path / "w.pt", weights_only=True)
    single = dict(apply_edit_(tiny_llama(), pretrained=pre_path, edit=DARE(p=0.5, seed=3)).named_parameters())
    post = dict(tiny_llama().named_parameters())
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(sharded[name], value), name
        if value.ndim == 2:  # the norms' weights are ones in both models
            assert not torch.equal(value, post[name]), name


def test_fsdp1_strategy_is_refused_naming_model_parallel_strategy():
    """Lightning itself refuses FSDPStrategy on CPU ("requires a GPU accelerator") before any hook runs, so the two
    hooks that check it are called here with a trainer holding that strategy."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_delta.callbacks import RiemannCallback
    from lightning_delta.module import DeltaEditModule

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    model = tiny_llama()
    module = DeltaEditModule(model, pretrained={}, edit={})
    module._trainer = trainer
    match = r"not FSDPStrategy .* strategy=ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)"
    with pytest.raises(ValueError, match=match):
        module.setup("validate")
    with pytest.raises(ValueError, match=match):
        RiemannCallback().setup(trainer, module, "validate")
