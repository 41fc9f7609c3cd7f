"""The Riemann sweep's sums, reduced across processes, and the figures derived from them."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_delta.callbacks.quadrature import Schedule, schedule
from lightning_delta.edits import EDITS

__all__ = ["RiemannSums", "RiemannResult", "module_groups"]


class RiemannSums(Metric):
    """Float64 sums over the evaluation set for the sweep's points ``t_0 = 0 < … < t_C = 1`` (``t_c = c/C`` for the
    left rule and the trapezoid; see :mod:`~lightning_delta.callbacks.quadrature`), reduced by summing.

    States:
        inner: (C+1, K) ``Σ_batches ⟨∇(Σ_items loss)(t_c), E_k⟩`` per point and tensor (0 where no backward ran).
        loss: (C+1,) ``Σ_batches Σ_items loss(t_c)``.
        count: () the number of items (tokens or examples).
    """

    full_state_update = False
    inner: Tensor
    loss: Tensor
    count: Tensor

    def __init__(self, num_points: int, num_tensors: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (num_points + 1, num_tensors)
        self.add_state("inner", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss", torch.zeros(num_points + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, inner: Tensor, loss: Tensor, count: Tensor | float) -> None:
        self.inner += inner.to(self.inner)
        self.loss += loss.to(self.loss)
        self.count += torch.as_tensor(count).to(self.count)

    def compute(self) -> dict[str, Tensor]:
        return {"inner": self.inner, "loss": self.loss, "count": self.count}


_KINDS = (
    ("attention", r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv|out_proj)"),
    (
        "mlp",
        r"(mlp|ffn|feed_forward|fc\d|gate_proj|up_proj|down_proj|intermediate|dense_h_to_4h|dense_4h_to_h|w[123]\b)",
    ),
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

    ``term = Σ_j w_j ⟨∇L(W_post + t_j E), E⟩`` with the points ``t_j`` and weights ``w_j`` of ``rule``: by default the
    paper's left rule ``(1/C) Σ_{c<C} ⟨∇L(W_post + (c/C)E), E⟩`` (eq. 1); ``trapezoid`` is the trapezoid on the left
    rule's points when a backward ran at t = 1; ``exact = L(W_post + E) − L(W_post)``, and ``completeness_gap =
    |term − exact|``, the rule's error on the total, for free. ``points``, ``losses`` and ``inner_products`` have one
    entry per point the sweep ran (NaN products where it ran no backward); ``inner_products_per_tensor`` lists, per
    tensor, the products at the points with a backward. ``passes``: backward passes per batch. The adaptive rule adds
    ``error_per_tensor``, its estimate of each per-tensor term's error.
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
    rule: str  # the quadrature rule (lightning_delta.callbacks.quadrature)
    points: list[float]  # t of every point
    weights: list[float]  # the rule's weight at each point (0 where it only measured the loss)
    accuracy_post: float | None = None  # the task's accuracy at W_post (t = 0), when the target has an evaluator
    accuracy_edit: float | None = None  # and at W_pre + F(ΔW) (t = 1)
    term_per_tensor: dict[str, float] = field(default_factory=dict)
    term_per_group: dict[str, float] = field(default_factory=dict)
    inner_products_per_tensor: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    passes: int | None = None
    completeness_gap: float | None = None
    error_per_tensor: dict[str, float] = field(default_factory=dict)

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
        points: Schedule | None = None,
        error_per_tensor: Tensor | None = None,
    ) -> RiemannResult:
        """The result of the sums of a sweep over ``points`` (default: the left rule with C = ``inner.shape[0] − 1``
        and, with ``trapezoid``, a backward at t = 1)."""
        if points is None:
            points = schedule("left", inner.shape[0] - 1, trapezoid)
        if float(count) <= 0:
            raise ValueError("The evaluation set had no items (tokens or examples) to average the loss over.")
        last = len(points.points) - 1
        gradient = torch.tensor(points.gradient)
        mean_inner = (inner / count).cpu()  # (points, K)
        losses = (loss / count).cpu()
        if points.rule == "left":
            per_tensor = mean_inner[:last].mean(dim=0)  # the paper's rule exactly as it always was computed
        else:
            weights = torch.tensor(points.weights, dtype=torch.float64)
            per_tensor = weights[gradient] @ mean_inner[gradient]
        totals = mean_inner.sum(dim=1)  # (points,)
        trapezoid_value = None
        if points.rule in ("left", "trapezoid") and points.gradient[last]:
            trapezoid_value = float((totals[0] / 2 + totals[1:last].sum() + totals[last] / 2) / last)
        totals[~gradient] = math.nan
        groups: dict[str, float] = {}
        for name, value in zip(names, per_tensor.tolist()):
            for group in module_groups(name):
                groups[group] = groups.get(group, 0.0) + value
        term = float(per_tensor.sum())
        exact = float(losses[last] - losses[0])
        return cls(
            num_points=points.passes if points.rule in ("gauss", "adaptive") else last,
            count=float(count),
            losses=losses.tolist(),
            inner_products=totals.tolist(),
            term=term,
            trapezoid=trapezoid_value,
            exact=exact,
            loss_post=float(losses[0]),
            loss_edit=float(losses[last]),
            accuracy_post=accuracy[0] if accuracy is not None else None,
            accuracy_edit=accuracy[1] if accuracy is not None else None,
            term_per_tensor=dict(zip(names, per_tensor.tolist())),
            term_per_group=groups,
            inner_products_per_tensor={name: mean_inner[gradient, k].tolist() for k, name in enumerate(names)},
            config=dict(config or {}),
            rule=points.rule,
            points=list(points.points),
            weights=list(points.weights),
            passes=points.passes,
            completeness_gap=abs(term - exact),
            error_per_tensor={} if error_per_tensor is None else dict(zip(names, error_per_tensor.tolist())),
        )

    def metrics(self) -> dict[str, float]:
        """The scalars logged as ``riemann/...``."""
        values = {
            "riemann/term": self.term,
            "riemann/exact": self.exact,
            "riemann/loss_post": self.loss_post,
            "riemann/loss_edit": self.loss_edit,
        }
        if self.completeness_gap is not None:
            values["riemann/completeness_gap"] = self.completeness_gap
        if self.error_per_tensor:
            assert self.passes is not None  # set by from_sums, the only maker of error estimates
            values["riemann/error_estimate"] = max(self.error_per_tensor.values())
            values["riemann/passes"] = float(self.passes)
        if self.trapezoid is not None:
            values["riemann/trapezoid"] = self.trapezoid
        if self.accuracy_post is not None:
            assert self.accuracy_edit is not None  # measured together (from_sums' accuracy pair)
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
        """The result that :meth:`to_dict` gave ``data``; fields with defaults may be missing.

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

    def table(self, dataset: str = "", written: str | os.PathLike | None = None, top: int = 5) -> str:
        """The result as a few lines: term, trapezoid, exact ΔL, the losses, the accuracy, and the ``top`` modules by
        |term| (a module's term is the sum of its tensors'); ``dataset`` names the data in the title and ``written``
        the file the result went to."""
        edit = self.config.get("edit") or {}
        name = EDITS[edit["name"]].__name__ if edit.get("name") in EDITS else edit.get("name", "the edit")
        arguments = ", ".join(f"{key}={value}" for key, value in edit.items() if key != "name")
        title = f"Riemann analysis of {name}({arguments})" + (f" on {dataset}" if dataset else "")
        points = f"C = {self.num_points}" if self.rule in ("left", "trapezoid") else f"{self.passes} nodes"
        title += f", {points}, mean over {self.count:g} items (tokens or examples)"
        rows = [
            (f"term ({self.rule} rule)", f"{self.term:+.6g}"),
            ("trapezoid", "-" if self.trapezoid is None else f"{self.trapezoid:+.6g}"),
            ("exact ΔL", f"{self.exact:+.6g}"),
            ("loss W_post -> edited", f"{self.loss_post:.6g} -> {self.loss_edit:.6g}"),
        ]
        if self.rule != "left":
            rows.append(("|term − exact ΔL|", f"{self.completeness_gap:.3g} ({self.passes} backward passes)"))
        if self.error_per_tensor:
            rows.append(("error estimate", f"{max(self.error_per_tensor.values()):.3g} (largest per tensor)"))
        if self.accuracy_post is not None and self.accuracy_edit is not None:
            rows.append(
                ("accuracy W_post -> edited", f"{100 * self.accuracy_post:.2f}% -> {100 * self.accuracy_edit:.2f}%")
            )
        modules: dict[str, float] = {}
        for tensor, value in self.term_per_tensor.items():
            module = tensor.rsplit(".", 1)[0] if "." in tensor else tensor
            modules[module] = modules.get(module, 0.0) + value
        largest = sorted(modules.items(), key=lambda item: abs(item[1]), reverse=True)[:top]
        width = max(len(label) for label, _ in rows)
        lines = [title] + [f"  {label.ljust(width)}  {value}" for label, value in rows]
        if largest:
            lines.append(f"  top {len(largest)} of {len(modules)} modules by |term|:")
            module_width = max(len(module) for module, _ in largest)
            lines += [f"    {module.ljust(module_width)}  {value:+.4g}" for module, value in largest]
        if written is not None:
            written = Path(written)
            if written.is_absolute() and written.is_relative_to(Path.cwd()):
                written = written.relative_to(Path.cwd())
            lines.append(f"  written to {written}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RiemannResult:
        return cls.from_dict(json.loads(Path(path).read_text()))
