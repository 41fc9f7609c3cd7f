"""Compressed deltas: size per family against the dense delta, load and swap time against ``from_pretrained`` of a
full model, and the memory of one base holding N deltas against N full models.

A bf16 Llama pair (the post-trained model is the base plus ``scale · N(0, 1)`` rounded to bf16, so ΔW has the exact
zeros of a real bf16 fine-tune) is written once; then

* **sizes**: the tensor bytes of ``save_compressed`` per edit, against the dense delta in float32 (what gives the
  model back bit for bit) and in bf16; BitDelta over the linear layers alone for the 1/16 goal; every round trip is
  checked bit for bit against ``save_edited``;
* **time** (median of ``--rounds``): ``load_compressed(base, delta)`` and one swap (``apply_compressed_`` then
  ``remove_compressed_`` of a delta held in memory) against ``from_pretrained`` of the full edited model;
* **memory** (each in a fresh process, resident set over the process after its imports): one base plus N compressed
  deltas held in memory and swapped through once, against N full models loaded with ``from_pretrained``.

Usage: ``python -m benchmarks.compress [--size small|tiny] [--deltas 8] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, MiB, _status_bytes, median, peak_rss_bytes, reset_peak_rss, rss_bytes

SIZES = {  # hidden, intermediate, layers, vocabulary
    "tiny": (32, 64, 2, 128),
    "small": (512, 1376, 4, 8192),
}


def edits() -> dict:
    from lightning_delta.edits import DARE, DELLA, BitDelta, Extrapolate, LowRank, MagnitudePrune

    return {
        "BitDelta 1 bit, sign(0)=+1": BitDelta(sign_of_zero=1),
        "BitDelta 1 bit": BitDelta(),
        "BitDelta 3 bits": BitDelta(bits=3),
        "DARE p=0.9": DARE(p=0.9, seed=0),
        "TIES trim p=0.9": MagnitudePrune(p=0.9),
        "DELLA p=0.9": DELLA(p=0.9, epsilon=0.1),
        "LowRank r=8": LowRank(rank=8),
        "EXPO α=0.5": Extrapolate(alpha=0.5),
    }


def make_pair(root: Path, size: str) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, vocabulary = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    pre = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    pre.save_pretrained(root / "pre")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in pre.parameters():
            parameter.add_((0.002 * torch.randn(parameter.shape, generator=generator)).to(parameter.dtype))
    pre.save_pretrained(root / "post")
    return root / "pre", root / "post"


def file_bytes(directory: Path) -> dict[str, int]:
    """Tensor data bytes per tensor of a compressed delta, from its safetensors headers."""
    import struct

    sizes: dict[str, int] = {}
    for file in sorted(directory.glob("delta-*.safetensors")):
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        for key, entry in json.loads(raw[8 : 8 + length]).items():
            if key != "__metadata__":
                name = key.rpartition("/")[0]
                sizes[name] = sizes.get(name, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return sizes


def same_bits(a: dict, b: dict) -> bool:
    return all(
        torch.equal(a[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8))
        for name, tensor in b.items()
    )


def sizes_and_times(root: Path, pre: Path, post: Path, rounds: int) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lightning_delta.compress import (
        CompressedDelta,
        apply_compressed_,
        load_compressed,
        remove_compressed_,
        save_compressed,
    )
    from lightning_delta.export import save_edited

    base_state = load_file(str(pre / "model.safetensors"))
    linear = {name for name, tensor in base_state.items() if tensor.ndim == 2 and "embed" not in name}
    dense32 = sum(4 * tensor.numel() for tensor in base_state.values())
    rows = []
    for label, edit in edits().items():
        delta_dir = save_compressed(post, pretrained=pre, edit_or_plan=edit, output_dir=root / f"delta-{len(rows)}")
        edited_dir = save_edited(post, pretrained=pre, edit=edit, output_dir=root / f"edited-{len(rows)}")
        sizes = file_bytes(delta_dir)
        total = sum(sizes.values())
        loaded = load_compressed(pre, delta_dir)
        exact = same_bits(loaded.state_dict(), load_file(str(edited_dir / "model.safetensors")))
        load_times, full_times, swap_times = [], [], []
        held = CompressedDelta(delta_dir, in_memory=True)
        model = AutoModelForCausalLM.from_pretrained(pre)
        for _ in range(rounds):
            start = time.perf_counter()
            load_compressed(pre, delta_dir)
            load_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(edited_dir)
            full_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            apply_compressed_(model, held)
            remove_compressed_(model, held, pre)
            swap_times.append(time.perf_counter() - start)
        restored = same_bits(model.state_dict(), base_state)
        linear_bytes = sum(size for name, size in sizes.items() if name in linear)
        linear_dense16 = sum(2 * base_state[name].numel() for name in linear)
        rows.append(
            {
                "edit": label,
                "bytes": total,
                "of_dense_float32": total / dense32,
                "of_dense_bf16": total / (dense32 / 2),
                "linear_of_dense_bf16": linear_bytes / linear_dense16,
                "bit_exact": exact,
                "restored_exact": restored,
                "load_s": median(load_times),
                "from_pretrained_s": median(full_times),
                "swap_s": median(swap_times),
            }
        )
    return {"dense_float32_bytes": dense32, "rows": rows}


def resident(model: torch.nn.Module) -> torch.nn.Module:
    """The model's weights copied into memory of their own: ``from_pretrained`` may leave them as pages of the
    memory-mapped file, which the resident set counts only once touched."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model


class AnonymousPeak:
    """The largest rise of the anonymous resident set (``RssAnon``: memory of the process's own, not pages of mapped
    files) while the block runs, sampled every 0.5 ms from ``/proc/self/status`` in a thread."""

    def __enter__(self) -> AnonymousPeak:
        self.start = self.peak = _status_bytes("RssAnon")
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _status_bytes("RssAnon"))
            time.sleep(0.0005)

    def __exit__(self, *exc_info: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))

    @property
    def rise(self) -> int:
        return self.peak - self.start


def memory_worker(kind: str, pre: str, paths: list[str]) -> dict:
    """In a fresh process: the resident set over the process after its imports, holding one base and the
    compressed deltas (swapped through once) or one full model per path."""
    from transformers import AutoModelForCausalLM

    from lightning_delta.compress import CompressedDelta, apply_compressed_, remove_compressed_

    torch.set_num_threads(1)
    warm_up = AutoModelForCausalLM.from_pretrained(pre)  # imports the model's modules before the baseline
    del warm_up
    gc.collect()
    start = rss_bytes()
    if kind == "deltas":
        model = resident(AutoModelForCausalLM.from_pretrained(pre))
        held = [CompressedDelta(path, in_memory=True) for path in paths]
        for delta in held:  # the parts in memory of their own, not pages of the files
            delta._parts = {key: part.clone() for key, part in delta._parts.items()}
        settled = rss_bytes()
        applying = restoring = applying_anonymous = restoring_anonymous = 0  # each step's extra peak, over the deltas
        for delta in held:
            reset_peak_rss()
            before = rss_bytes()
            with AnonymousPeak() as anonymous:
                apply_compressed_(model, delta)
            applying = max(applying, peak_rss_bytes() - before)
            applying_anonymous = max(applying_anonymous, anonymous.rise)
            reset_peak_rss()
            before = rss_bytes()
            with AnonymousPeak() as anonymous:
                remove_compressed_(model, delta, pre)
            restoring = max(restoring, peak_rss_bytes() - before)
            restoring_anonymous = max(restoring_anonymous, anonymous.rise)
        compressed = sum(delta.nbytes for delta in held)
    else:
        models = [resident(AutoModelForCausalLM.from_pretrained(path)) for path in paths]
        settled = rss_bytes()
        reset_peak_rss()
        compressed = applying = restoring = applying_anonymous = restoring_anonymous = 0
    base = sum(p.numel() * p.element_size() for p in (model if kind == "deltas" else models[0]).parameters())
    largest = max(p.numel() for p in (model if kind == "deltas" else models[0]).parameters())
    swapping = max(applying, restoring) if kind == "deltas" else max(0, peak_rss_bytes() - settled)
    return {
        "held_bytes": settled - start,
        "peak_while_swapping_bytes": swapping,
        "peak_applying_bytes": applying,
        "peak_restoring_bytes": restoring,
        "peak_applying_anonymous_bytes": applying_anonymous,
        "peak_restoring_anonymous_bytes": restoring_anonymous,
        "base_bytes": base,
        "compressed_bytes": compressed,
        "largest_tensor_float32_bytes": 4 * largest,
    }


def memory(root: Path, pre: Path, post: Path, count: int) -> dict:
    from lightning_delta.compress import save_compressed
    from lightning_delta.edits import DARE, BitDelta
    from lightning_delta.export import save_edited

    deltas, fulls = [], []
    for index in range(count):
        edit = BitDelta(bits=1 + index % 2, sign_of_zero=1) if index % 2 else DARE(p=0.9, seed=index)
        deltas.append(
            str(save_compressed(post, pretrained=pre, edit_or_plan=edit, output_dir=root / f"n-delta-{index}"))
        )
        fulls.append(str(save_edited(post, pretrained=pre, edit=edit, output_dir=root / f"n-full-{index}")))
    results = {}
    for kind, paths in (("deltas", deltas), ("full", fulls)):
        command = [
            sys.executable,
            "-m",
            "benchmarks.compress",
            "--worker",
            kind,
            "--pre",
            str(pre),
            "--paths",
            json.dumps(paths),
        ]
        output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", choices=["deltas", "full"])
    parser.add_argument("--pre")
    parser.add_argument("--paths")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.pre, json.loads(args.paths))))
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        pre, post = make_pair(root, args.size)
        measured = sizes_and_times(root, pre, post, args.rounds)
        used = memory(root, pre, post, args.deltas)
    hidden, intermediate, layers, vocabulary = SIZES[args.size]
    print(
        f"bf16 Llama hidden {hidden}, intermediate {intermediate}, {layers} layers, vocabulary {vocabulary}; dense "
        f"float32 delta {measured['dense_float32_bytes'] / MiB:.2f} MiB; one thread, median of {args.rounds}"
    )
    print(
        "| edit | tensor bytes | × dense float32 | × dense bf16 | linear layers × dense bf16 | bit-exact | "
        "load (s) | from_pretrained (s) | swap (s) |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for row in measured["rows"]:
        print(
            f"| {row['edit']} | {row['bytes']:,} | {row['of_dense_float32']:.4f} | {row['of_dense_bf16']:.4f} | "
            f"{row['linear_of_dense_bf16']:.4f} | {row['bit_exact'] and row['restored_exact']} | "
            f"{row['load_s']:.3f} | {row['from_pretrained_s']:.3f} | {row['swap_s']:.3f} |"
        )
    deltas, full = used["deltas"], used["full"]
    print(
        f"memory, N = {args.deltas}: one base + N deltas held {deltas['held_bytes'] / MiB:.1f} MiB (base "
        f"{deltas['base_bytes'] / MiB:.1f} MiB + compressed {deltas['compressed_bytes'] / MiB:.1f} MiB), extra peak "
        f"while swapping through all {deltas['peak_while_swapping_bytes'] / MiB:.1f} MiB (applying a delta "
        f"{deltas['peak_applying_bytes'] / MiB:.1f} MiB ({deltas['peak_applying_anonymous_bytes'] / MiB:.1f} MiB "
        f"anonymous), restoring W_pre from the base's files {deltas['peak_restoring_bytes'] / MiB:.1f} MiB "
        f"({deltas['peak_restoring_anonymous_bytes'] / MiB:.1f} MiB anonymous, the rest pages of the mapped file); "
        f"largest tensor in float32 "
        f"{deltas['largest_tensor_float32_bytes'] / MiB:.1f} MiB); N full models {full['held_bytes'] / MiB:.1f} MiB "
        f"({full['held_bytes'] / max(deltas['held_bytes'], 1):.2f}×)"
    )
    print(json.dumps({"sizes": measured, "memory": used}))


if __name__ == "__main__":
    main()
