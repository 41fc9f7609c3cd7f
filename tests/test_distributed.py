"""Two CPU processes (ddp, ddp_spawn) and two nodes of one process give the numbers of one process.

Each run is a real set of processes started on `tests/support/distributed_riemann.py`; the data set (37 rows, batches
of 4) divides neither the number of processes nor the batch size. Every process runs one thread, so that the
float32 parts of the model (HF's softmax and RMSNorm) reduce in the same order everywhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "support" / "distributed_riemann.py"
ROOT = SCRIPT.parents[2]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(out: Path, strategy: str, devices: int, num_nodes: int = 1, *options: str, **extra: str) -> None:
    command = [sys.executable, str(SCRIPT), str(out), strategy, str(devices), str(num_nodes), *options]
    subprocess.run(command, env=environment(**extra), cwd=ROOT, check=True, timeout=240, capture_output=True)


def load(out: Path, rank: int) -> dict:
    return json.loads(Path(f"{out}.rank{rank}").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "result"
    run(out, "auto", 1)
    return load(out, 0)


def assert_same(result: dict, reference: dict, rel: float = 1e-6) -> None:
    for key in ("term", "trapezoid", "exact", "loss_post", "loss_edit", "count"):
        assert result[key] == pytest.approx(reference[key], rel=rel), key
    assert result["losses"] == pytest.approx(reference["losses"], rel=rel)
    assert result["inner_products"] == pytest.approx(reference["inner_products"], rel=rel)
    assert result["term_per_tensor"].keys() == reference["term_per_tensor"].keys()
    for name, value in reference["term_per_tensor"].items():
        assert result["term_per_tensor"][name] == pytest.approx(value, rel=rel), name


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_equal_one(strategy, single, tmp_path):
    run(tmp_path / "result", strategy, devices=2)
    for rank in (0, 1):  # callback.result on every rank
        assert_same(load(tmp_path / "result", rank), single)


def test_two_nodes_equal_one_process(single, tmp_path):
    out, port = tmp_path / "result", free_port()
    command = [sys.executable, str(SCRIPT), str(out), "ddp", "1", "2"]
    nodes = [
        subprocess.Popen(
            command,
            env=environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (1, 0)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=240)
        assert node.returncode == 0, output.decode()[-3000:]
    for rank in (0, 1):
        assert_same(load(out, rank), single)


def test_gsm8k_datamodule_two_processes_equal_one(tmp_path):
    """The GSM8K DataModule under DDP with Lightning's defaults: its own unrepeated sampler, 7 rows, batches of 3."""
    options = ("3", "float64", "gsm8k")
    run(tmp_path / "single", "auto", 1, 1, *options)
    run(tmp_path / "double", "ddp_spawn", 2, 1, *options)
    single = load(tmp_path / "single", 0)
    assert single["count"] > 0
    for rank in (0, 1):
        assert_same(load(tmp_path / "double", rank), single)
