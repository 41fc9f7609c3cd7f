"""The quadrature cases of issue-sized tables: a tanh MLP 64-512-512-10 on scikit-learn's digits, float64.

:func:`digits_mlp_pair` trains W_pre on half of the training images, then post-trains on all of them (ΔW about 9 % of
‖W_pre‖); :data:`TABLE_EDITS` are the edits the tables measure. Deterministic: fixed seeds, one thread's worth of
float64 arithmetic, a few seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_delta.edits import DARE, BitDelta, Extrapolate

TABLE_EDITS = {
    "DARE p = 0.9": lambda: DARE(p=0.9, seed=0),
    "DARE p = 0.99": lambda: DARE(p=0.99, seed=0),
    "BitDelta": lambda: BitDelta(),
    "EXPO α = −1": lambda: Extrapolate(alpha=-1.0),
}


@dataclass
class DigitsPair:
    post: nn.Module
    pre: dict[str, torch.Tensor]  # W_pre as a state dict
    loader: DataLoader  # the evaluation images: (image, label) batches

    def ratio(self) -> float:
        """‖ΔW‖ / ‖W_pre‖ over all tensors."""
        post = dict(self.post.named_parameters())
        delta = sum(float((post[name].detach() - value).square().sum()) for name, value in self.pre.items())
        return (delta / sum(float(value.square().sum()) for value in self.pre.values())) ** 0.5


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)).double()


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, len(images), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def digits_mlp_pair(
    eval_rows: int = 597, batch_size: int = 300, pre_steps: int = 150, post_steps: int = 150, post_lr: float = 1.3e-4
) -> DigitsPair:
    """W_pre: the MLP after ``pre_steps`` Adam steps on the first 600 training images; W_post: after ``post_steps``
    more on all 1,200. Evaluated on the last ``eval_rows`` of the 1,797 images."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float64)
    labels = torch.tensor(labels, dtype=torch.long)
    model = mlp()
    _train(model, images[:600], labels[:600], pre_steps, 1e-3, seed=1)
    pre = {name: value.detach().clone() for name, value in model.named_parameters()}
    _train(model, images[:1200], labels[:1200], post_steps, post_lr, seed=2)
    model.eval()
    evaluation = TensorDataset(images[-eval_rows:], labels[-eval_rows:])
    return DigitsPair(model, pre, DataLoader(evaluation, batch_size=batch_size))
