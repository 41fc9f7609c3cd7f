"""The README's multi-node trainer on CPU processes, as a user's script would use it; started by the tests.

Usage: python tests/support/readme_multinode.py WORKDIR PRE POST DATA DEVICES STRATEGY LOGGER(true|false)

The README's quick-start module (DeltaEditModule, DARE p = 0.9) is validated with the README's multi-node Trainer
(GPUs swapped for CPU processes) in WORKDIR; the callback writes riemann.json where the user would find it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_delta import DeltaEditModule, edits  # noqa: E402
from lightning_delta.callbacks import RiemannCallback  # noqa: E402
from lightning_delta.datamodules import GSM8KDataModule  # noqa: E402
from tests.support.readme_support import multi_node_on_cpu  # noqa: E402


def main() -> None:
    workdir, pre, post, data = sys.argv[1:5]
    devices, strategy, logger = int(sys.argv[5]), sys.argv[6], sys.argv[7] == "true"
    os.chdir(workdir)
    torch.set_num_threads(1)
    module = DeltaEditModule(model=post, pretrained=pre, edit=edits.DARE(p=0.9, k=0.0, seed=0), loss="causal_lm")
    namespace = {"pl": pl, "RiemannCallback": RiemannCallback}
    exec(multi_node_on_cpu(devices, strategy, logger), namespace)
    trainer = namespace["trainer"]
    trainer.validate(module, datamodule=GSM8KDataModule(post, data=data, batch_size=1), verbose=False)


if __name__ == "__main__":
    main()
