"""Tiny models, data and an independent brute-force reference for the Riemann tests.

The reference never uses the parametrization: for each point it writes ``W_post + (c/C)·E`` into a plain copy of
the model, takes the full weight gradients of the summed loss with ``requires_grad`` on every weight, and forms
``Σ grad·E`` in float64 per tensor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

VOCAB, SEQ = 64, 12


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float64, num_labels: int = 5) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config).to(dtype).eval()


def random_edits(model: nn.Module, pattern: str = "", scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        for name, p in model.named_parameters()
        if pattern in name
    }


def token_dataset(n: int = 37, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=generator)
        prompt = int(torch.randint(2, 6, (), generator=generator))
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def image_dataset(n: int = 23, num_labels: int = 5, dtype=torch.float64, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    return list(zip(images, labels))


def brute_force(model: nn.Module, edits: dict, loss_fn, loader: DataLoader, num_points: int) -> dict:
    """Per point c = 0..C: mean loss and per-tensor ⟨∇L, E⟩ from explicit weight gradients (float64 products)."""
    names = sorted(edits)
    inner = torch.zeros(num_points + 1, len(names), dtype=torch.float64)
    losses = torch.zeros(num_points + 1, dtype=torch.float64)
    for c in range(num_points + 1):
        point = copy.deepcopy(model)
        parameters = dict(point.named_parameters())
        with torch.no_grad():
            for name in names:
                parameters[name].add_(edits[name].to(parameters[name].dtype) * (c / num_points))
        for parameter in point.parameters():
            parameter.requires_grad_(True)
        total, count = 0.0, 0.0
        for batch in loader:
            output = loss_fn(point, batch)
            output.total.backward()
            total += float(output.total)
            count += float(output.count)
        for k, name in enumerate(names):
            inner[c, k] = (parameters[name].grad.double() * edits[name].double()).sum() / count
        losses[c] = total / count
    left = inner[:num_points].mean(dim=0)
    return {"names": names, "inner": inner, "losses": losses, "term_per_tensor": dict(zip(names, left.tolist()))}


def weights_at(model: nn.Module, edits: dict, t: float) -> nn.Module:
    """A plain copy of ``model`` with weights ``W_post + t·E`` (no parametrization)."""
    point = copy.deepcopy(model)
    parameters = dict(point.named_parameters())
    with torch.no_grad():
        for name, edit in edits.items():
            parameters[name].add_(edit.to(parameters[name].dtype) * t)
    return point


def plain_loss(model: nn.Module, edits: dict, loss_fn, loader: DataLoader, t: float) -> float:
    """The mean loss of ``W_post + t·E`` from plain forward passes."""
    point = weights_at(model, edits, t)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in loader:
            output = loss_fn(point, batch)
            total += float(output.total)
            count += float(output.count)
    return total / count


def integrand(model: nn.Module, edits: dict, loss_fn, loader: DataLoader, t: float) -> torch.Tensor:
    """``⟨∇L(W_post + t·E), E_k⟩`` per tensor (sorted names), float64, from ``torch.autograd.grad`` on a plain copy
    at any ``t``: the integrand of ΔL = ∫₀¹ Σ_k g_k(t) dt, independent of the parametrization."""
    names = sorted(edits)
    point = weights_at(model, edits, t)
    parameters = dict(point.named_parameters())
    weights = [parameters[name] for name in names]
    sums = torch.zeros(len(names), dtype=torch.float64)
    count = 0.0
    for batch in loader:
        output = loss_fn(point, batch)
        gradients = torch.autograd.grad(output.total, weights)
        sums += torch.stack([(g.double() * edits[name].double()).sum() for g, name in zip(gradients, names)])
        count += float(output.count)
    return sums / count


def quadrature(model: nn.Module, edits: dict, loss_fn, loader: DataLoader, nodes, weights) -> torch.Tensor:
    """``Σ_i w_i g(t_i)`` per tensor (sorted names) with :func:`integrand` at each node: an explicit loop over t."""
    return sum(float(w) * integrand(model, edits, loss_fn, loader, float(t)) for t, w in zip(nodes, weights))
