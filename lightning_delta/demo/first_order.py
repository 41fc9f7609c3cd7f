"""Eq. 6 from one gradient at W_post: the first-order term ``⟨∇L(W_post), E⟩`` of DARE and drop only under several
masks, and its agreement with the sweep's first inner product (two ways of one number)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import LlamaForCausalLM

from lightning_delta.delta import compute_delta
from lightning_delta.demo.analysis import first_order_terms, gradient_inner_product, loss_gradient
from lightning_delta.demo.digits import digit_sequences, load_digit_splits
from lightning_delta.demo.pair import DemoPair
from lightning_delta.edits import DARE
from lightning_delta.sweep import SweepRow

__all__ = ["gradient_and_deltas", "gradient_terms", "sweep_agreement"]


def gradient_and_deltas(pair: DemoPair, eval_limit: int | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∇L(W_post) of the answer loss over the test images the sweep analyses, and ΔW, for every edited tensor."""
    model = LlamaForCausalLM.from_pretrained(pair.post_dir)
    model.eval()
    images, digits = load_digit_splits()["test"]
    if eval_limit is not None:
        images, digits = images[:eval_limit], digits[:eval_limit]
    gradients = loss_gradient(model, digit_sequences(images, digits))
    deltas = compute_delta(str(pair.post_dir), pretrained=str(pair.pre_dir))
    return {name: gradients[name] for name in deltas}, deltas


def gradient_terms(
    gradients: dict[str, Tensor], deltas: dict[str, Tensor], seeds: int, ps: tuple[float, ...] = (0.9, 0.99)
) -> dict[str, Any]:
    """Eq. 6 from one gradient: ``⟨∇L(W_post), E⟩`` for DARE and drop only under ``seeds`` masks at each ``p``, and
    ``⟨∇L(W_post), ΔW⟩``."""
    result: dict[str, Any] = {"gradient_delta": gradient_inner_product(gradients, deltas), "dare": {}, "drop_only": {}}
    for p in ps:
        result["dare"][p] = first_order_terms(gradients, deltas, (DARE(p=p, seed=seed) for seed in range(seeds)))
        result["drop_only"][p] = first_order_terms(
            gradients, deltas, (DARE(p=p, rescale=False, seed=seed) for seed in range(seeds))
        )
    return result


def sweep_agreement(terms: dict[str, Any], rows: list[SweepRow], scales: dict[str, float]) -> dict[float, float]:
    """For each p of ``terms``, the largest ``|⟨∇L(W_post), E⟩ − c=0 inner product|`` between :func:`gradient_terms`
    and the sweep's rows of the same masks (DARE and drop only, W_pre of the pair): two ways of one number."""
    agreement: dict[float, float] = {}
    for row in rows:
        p, seed = row.edit.get("p"), row.edit.get("seed")
        family = "drop_only" if row.edit.get("rescale") is False else "dare"
        if (
            row.edit.get("name") != "dare"
            or row.edit.get("k", 0.0) != 0.0
            or row.dataset != "Digits/test"
            or scales.get(str(row.config.get("model", {}).get("pretrained")), 1.0) != 1.0
            or p is None
            or p not in terms.get(family, {})
            or seed is None
            or seed >= len(terms[family][p])
        ):
            continue
        difference = abs(terms[family][p][seed] - row.result.inner_products[0])
        agreement[p] = max(agreement.get(p, 0.0), difference)
    return agreement
