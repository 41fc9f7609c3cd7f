"""The Riemann sweep's sums, reduced across processes, and the figures derived from them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RiemannSums", "RiemannResult", "module_groups"]


class RiemannSums(Metric):
    """Float64 sums over the evaluation set for points ``t_c = c/C``, ``c = 0 … C``, reduced by summing.

    States:
        inner: (C+1, K) ``Σ_batches ⟨∇(Σ_items loss)(t_c), E_k⟩`` per point and tensor.
        loss: (C+1,) ``Σ_batches Σ_items loss(t_c)``.
        count: () the number of items (tokens or examples).
    """

    full_state_update = False

    def __init__(self, num_points: int, num_tensors: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (num_points + 1, num_tensors)
        self.add_state("inner", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss", torch.zeros(num_points + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, inner: Tensor, loss: Tensor, count: Tensor) -> None:
        self.inner += inner.to(self.inner)
        self.loss += loss.to(self.loss)
        self.count += torch.as_tensor(count).to(self.count)

    def compute(self) -> dict[str, Tensor]:
        return {"inner": self.inner, "loss": self.loss, "count": self.count}


_KINDS = (
    ("attention", r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv|out_proj)"),
    ("mlp", r"(mlp|ffn|feed_forward|fc\d|gate_proj|up_proj|down_proj|intermediate|dense_h_to_4h|dense_4h_to_h|w[123]\b)"),
    ("norms", r"(norm|ln_|layernorm|\bln\d?\b)"),
    ("embeddings", r"(embed|wte|wpe|lm_head|patch|position|class_embedding|token)"),
)
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def module_groups(name: str) -> list[str]:
    """The groups a tensor belongs to: its kind (attention, mlp, norms, embeddings, other) and ``layer.<i>``."""
    lowered = name.lower()
    kind = next((kind for kind, pattern in _KINDS if re.search(pattern, lowered)), "other")
    layer = _LAYER.search(f".{name}")
    return [kind] + ([f"layer.{int(layer.group(1))}"] if layer else [])


@dataclass
class RiemannResult:
    """What one sweep measured; every loss is the mean over the evaluation set.

    ``term = (1/C) Σ_{c<C} ⟨∇L(W_post + (c/C)E), E⟩`` (the paper's left rule, eq. 1), ``trapezoid`` adds half of
    the end points instead, ``exact = L(W_post + E) − L(W_post)``.
    """

    num_points: int
    count: float
    losses: list[float]
    inner_products: list[float]
    term: float
    trapezoid: float | None
    exact: float
    loss_post: float
    loss_edit: float
    accuracy_post: float | None = None  # the task's accuracy at W_post (t = 0), when the target has an evaluator
    accuracy_edit: float | None = None  # and at W_pre + F(ΔW) (t = 1)
    term_per_tensor: dict[str, float] = field(default_factory=dict)
    term_per_group: dict[str, float] = field(default_factory=dict)
    inner_products_per_tensor: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sums(
        cls,
        names: list[str],
        inner: Tensor,
        loss: Tensor,
        count: Tensor,
        trapezoid: bool = True,
        config: dict[str, Any] | None = None,
        accuracy: tuple[float, float] | None = None,
    ) -> RiemannResult:
        num_points = inner.shape[0] - 1
        if float(count) <= 0:
            raise ValueError("The evaluation set had no items (tokens or examples) to average the loss over.")
        mean_inner = (inner / count).cpu()  # (C+1, K)
        losses = (loss / count).cpu()
        per_tensor = mean_inner[:num_points].mean(dim=0)  # left rule per tensor
        totals = mean_inner.sum(dim=1)  # (C+1,)
        trapezoid_value = None
        if trapezoid:
            trapezoid_value = float((totals[0] / 2 + totals[1:num_points].sum() + totals[num_points] / 2) / num_points)
        else:
            totals[num_points] = math.nan
        groups: dict[str, float] = {}
        for name, value in zip(names, per_tensor.tolist()):
            for group in module_groups(name):
                groups[group] = groups.get(group, 0.0) + value
        return cls(
            num_points=num_points,
            count=float(count),
            losses=losses.tolist(),
            inner_products=totals.tolist(),
            term=float(per_tensor.sum()),
            trapezoid=trapezoid_value,
            exact=float(losses[num_points] - losses[0]),
            loss_post=float(losses[0]),
            loss_edit=float(losses[num_points]),
            accuracy_post=accuracy[0] if accuracy is not None else None,
            accuracy_edit=accuracy[1] if accuracy is not None else None,
            term_per_tensor=dict(zip(names, per_tensor.tolist())),
            term_per_group=groups,
            inner_products_per_tensor={
                name: mean_inner[:, k].tolist() if trapezoid else mean_inner[:num_points, k].tolist()
                for k, name in enumerate(names)
            },
            config=dict(config or {}),
        )

    def metrics(self) -> dict[str, float]:
        """The scalars logged as ``riemann/...``."""
        values = {
            "riemann/term": self.term,
            "riemann/exact": self.exact,
            "riemann/loss_post": self.loss_post,
            "riemann/loss_edit": self.loss_edit,
        }
        if self.trapezoid is not None:
            values["riemann/trapezoid"] = self.trapezoid
        if self.accuracy_post is not None:
            values["riemann/accuracy_post"] = self.accuracy_post
            values["riemann/accuracy_edit"] = self.accuracy_edit
        for c, value in enumerate(self.losses):
            values[f"riemann/loss_at/{c}"] = value
        for group, value in self.term_per_group.items():
            values[f"riemann/group/{group}"] = value
        return values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiemannResult:
        """The result that :meth:`to_dict` gave ``data``; fields with defaults may be missing (rows of older versions).

        Raises:
            ValueError: naming the missing required fields and the unknown ones.
        """
        known = [item.name for item in fields(cls)]
        required = [item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        unknown = [name for name in data if name not in known]
        if missing or unknown:
            raise ValueError(
                f"Not a RiemannResult: missing fields {missing}, unknown fields {unknown}. Its fields are "
                f"{', '.join(known)}; {', '.join(required)} are required."
            )
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RiemannResult:
        return cls.from_dict(json.loads(Path(path).read_text()))
