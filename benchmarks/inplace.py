"""How W(t) is put into the model: the parametrization the library uses against writing W(t) in place.

Three ways to get every per-tensor ``⟨∇L(W_post + tE), E⟩`` of one point from one forward and backward pass:

- ``parametrization``: the library's :class:`~lightning_delta.parametrize.EditedModel` under ``recompute_weights``
  (``W(t)`` rebuilt in backward, a scalar ``t`` per tensor takes the gradient);
- ``parametrization_saved``: the same, autograd keeping each materialised ``W(t)`` for backward;
- ``in_place``: ``W(t)`` written into the weights (``W_post`` restored from a kept copy), every weight requiring a
  gradient, a post-accumulate-grad hook taking ``⟨grad, E⟩`` in float64 and freeing the gradient at once.

Each variant runs in its own process: the extra peak resident memory over the loaded model and E, and the time of
a point, median of ``--repeats`` points. Usage: ``python -m benchmarks.inplace [--hidden 1024 --layers 8]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import ROOT, MiB, PeakMemory

VARIANTS = ("parametrization", "parametrization_saved", "in_place")


def build(hidden: int, layers: int, tokens: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    edits = {
        name: 1e-3 * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
        if p.ndim == 2 and "embed" not in name
    }
    ids = torch.randint(0, 4096, (4, tokens // 4), generator=generator)
    return model, edits, ids


def loss_of(model, ids) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def run_variant(variant: str, hidden: int, layers: int, tokens: int, repeats: int) -> dict:
    torch.set_num_threads(2)
    model, edits, ids = build(hidden, layers, tokens)
    t = 0.4
    inner: dict[str, float] = {}
    if variant.startswith("parametrization"):
        from lightning_delta.parametrize import EditedModel

        edited = EditedModel(model, edits)
        names = edited.names

        def point() -> None:
            edited.set_t(t)
            if variant == "parametrization":
                with edited.recompute_weights():
                    loss_of(model, ids).backward()
            else:
                loss_of(model, ids).backward()
            inner.update(zip(names, edited.pop_inner_products().tolist()))
    else:
        from lightning_delta.parametrize import inner_product

        parameters = dict(model.named_parameters())
        post = {name: parameters[name].detach().clone() for name in edits}  # W_post, to restore and rebuild from
        for parameter in model.parameters():
            parameter.requires_grad_(False)

        def hook_for(name: str):
            def hook(parameter: torch.Tensor) -> None:
                inner[name] = float(inner_product(parameter.grad, edits[name]))
                parameter.grad = None

            return hook

        for name in edits:
            parameters[name].requires_grad_(True)
            parameters[name].register_post_accumulate_grad_hook(hook_for(name))

        def point() -> None:
            with torch.no_grad():
                for name, edit in edits.items():
                    torch.add(post[name], edit, alpha=t, out=parameters[name].data)
            loss_of(model, ids).backward()

    times = []
    with PeakMemory("cpu") as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            point()
            times.append(time.perf_counter() - start)
    edit_bytes = sum(e.numel() * e.element_size() for e in edits.values())
    return {
        "variant": variant,
        "time_s": sorted(times)[len(times) // 2],
        "extra_peak_mib": memory.extra / MiB,
        "edited_mib": edit_bytes / MiB,
        "inner": inner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.hidden, args.layers, args.tokens, args.repeats)))
        return
    results = {}
    for variant in VARIANTS:
        command = [
            sys.executable,
            "-m",
            "benchmarks.inplace",
            "--variant",
            variant,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--tokens",
            str(args.tokens),
            "--repeats",
            str(args.repeats),
        ]
        output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(output.splitlines()[-1])
    reference = results["parametrization"]["inner"]
    print(
        f"hidden {args.hidden}, {args.layers} layers, {args.tokens} tokens, edited weights "
        f"{results['parametrization']['edited_mib']:.0f} MiB (float32), 2 threads, median of {args.repeats} points"
    )
    print("| variant | time per point (s) | × parametrization | extra peak (MiB) | max rel. diff of ⟨∇L, E⟩ |")
    print("|---|---:|---:|---:|---:|")
    for variant, result in results.items():
        diff = max(abs(result["inner"][k] - v) / max(abs(v), 1e-30) for k, v in reference.items())
        print(
            f"| {variant} | {result['time_s']:.2f} | {result['time_s'] / results['parametrization']['time_s']:.2f} | "
            f"{result['extra_peak_mib']:.0f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
