"""The Precision table of the README: ``python -m benchmarks.precision`` (tiny models, about a minute on 2 cores).

1. The chunked inner product (float32 dots summed in float64) against an exact float64 sum of the same float32
   gradients, and a float32 model against the same model in float64 (tiny Llama, random E, t = 0.5).
2. A bf16 model with float32 ``E`` and with ``E_dtype="model"`` against the float32 model (tiny pre/post pair,
   DARE p = 0.9, C = 5, seeds 0–2).
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch
from torch.utils.data import DataLoader

import lightning_delta.parametrize as parametrize
from lightning_delta.losses import CausalLMLoss
from lightning_delta.parametrize import EditedModel
from tests.support.riemann_support import brute_force, random_edits, tiny_llama, token_dataset


def per_tensor_inner(model, E, loader, t: float, exact_dot: bool) -> torch.Tensor:
    edited = EditedModel(model, E)
    original = parametrize.inner_product
    if exact_dot:
        parametrize.inner_product = lambda grad, e: torch.dot(grad.reshape(-1).double(), e.reshape(-1).double())
    try:
        total = torch.zeros(len(edited.names), dtype=torch.float64)
        count = 0.0
        edited.set_t(t)
        for batch in loader:
            with edited.recompute_weights():
                output = CausalLMLoss()(model, batch)
                output.total.backward()
            total += edited.pop_inner_products()
            count += float(output.count)
    finally:
        parametrize.inner_product = original
        edited.remove()
    return total / count


def inner_product_rows() -> list[str]:
    model64 = tiny_llama(dtype=torch.float64)
    E64 = random_edits(model64, scale=0.05)
    loader = DataLoader(token_dataset(16), batch_size=8)
    reference = brute_force(model64, E64, CausalLMLoss(), loader, num_points=2)["inner"][1]
    model32 = copy.deepcopy(model64).float()
    E32 = {name: value.float() for name, value in E64.items()}
    chunked = per_tensor_inner(model32, E32, loader, 0.5, exact_dot=False)
    exact = per_tensor_inner(model32, E32, loader, 0.5, exact_dot=True)

    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).abs() / b.abs()).max())

    return [
        f"| the chunked inner product on float32 gradients (tiny Llama) | an exact float64 sum of the same products "
        f"| {worst(chunked, exact):.1e} relative, worst tensor |",
        f"| a float32 model (tiny Llama) | the same model in float64 | {worst(exact, reference):.0e} relative, "
        f"worst tensor |",
    ]


def bf16_rows(seeds: int = 3) -> list[str]:
    import lightning.pytorch as pl

    from lightning_delta import DeltaEditModule, edits
    from lightning_delta.callbacks import RiemannCallback
    from tests.support.tiny_models import make_tiny_pair

    pair = make_tiny_pair(tempfile.mkdtemp(), "llama", scale=0.01, shard=None)
    rows = token_dataset(64)
    for row in rows:
        row["input_ids"] = row["input_ids"] % 128
    loader = DataLoader(rows, batch_size=16)
    terms: dict[tuple[str, str], list[float]] = {}
    for dtype, E_dtype in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "model")):
        for seed in range(seeds):
            callback = RiemannCallback(num_points=5, filename=None)
            module = DeltaEditModule(
                str(pair.post_dir),
                pretrained=str(pair.pre_dir),
                edit=edits.DARE(p=0.9, seed=seed),
                dtype=dtype,
                E_dtype=E_dtype,
            )
            pl.Trainer(
                accelerator="cpu",
                inference_mode=False,
                callbacks=[callback],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            ).validate(module, loader, verbose=False)
            terms.setdefault((dtype, E_dtype), []).append(callback.result.term)
    reference = terms[("float32", "float32")]

    def offsets(values: list[float]) -> str:
        return ", ".join(f"{(value - ref) / abs(ref):+.2%}" for value, ref in zip(values, reference))

    return [
        f"| bf16 model, float32 `E` (tiny pair, DARE p = 0.9, C = 5, seeds 0–{seeds - 1}) | the float32 model | "
        f"term {offsets(terms[('bfloat16', 'float32')])} |",
        f'| bf16 model, `E_dtype="model"` (same runs) | the float32 model | '
        f"term {offsets(terms[('bfloat16', 'model')])} |",
    ]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print("| what | against | difference |\n|---|---|---|")
    for row in inner_product_rows() + bf16_rows():
        print(row)


if __name__ == "__main__":
    main()
