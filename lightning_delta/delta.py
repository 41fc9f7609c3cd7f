"""The delta parameters ΔW = W_post − W_pre of a post-trained model, one tensor at a time.

Paper (Tang et al. 2024, "A Unified View of Delta Parameter Editing in Post-Trained Large-Scale Models"), section 3:
every editing operation acts on ΔW, the difference between the post-trained and the pre-trained weights.

The two models can each be an ``nn.Module``, a state dict, a Hugging Face model directory (single or sharded
safetensors, ``pytorch_model.bin``), a single ``.safetensors`` file, or a hub id read from the Hub cache. safetensors
are memory-mapped and read tensor by tensor, and :func:`iter_delta` yields one delta at a time and keeps no other:
two 16 GB checkpoints never need 32 GB of memory.

Rules every function here follows:

* **Selection.** ``include`` / ``exclude`` are regular expressions (``re.search``) on tensor names. By default every
  floating-point tensor present in both models is selected; integer and bool buffers are skipped. A tensor that is
  floating point on one side and integer on the other (a quantized checkpoint) is an error, not skipped.
* **Tied tensors** (one tensor under two names, e.g. ``model.embed_tokens.weight`` and ``lm_head.weight`` with
  ``tie_word_embeddings``) appear once, under the first name in the post-trained model's state-dict order. A name
  that is an alias of a tied tensor on one side and absent on the other (``save_pretrained`` leaves the tied
  ``lm_head.weight`` out of the file) is not an error. A tied tensor is selected when one of its names matches
  ``include`` and none matches ``exclude``.
* **dtype.** The delta is computed per tensor as ``post.to(d) - pre.to(d)`` in ``d`` = the two dtypes promoted
  together and to at least float32: bf16 and float16 give float32, float64 stays float64 (:func:`delta_dtype`).
* **Checks.** Missing tensors, shape mismatches, NaN / inf values and empty selections raise ``ValueError`` naming
  the tensors and saying what to change.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_delta.edits.base import CHUNK_NUMEL
from lightning_delta.sources import TensorSource, format_names, load_tensors, tied_names

__all__ = [
    "DeltaMatch",
    "PairChecks",
    "TensorSource",
    "all_finite",
    "as_device",
    "check_real",
    "check_tied_targets",
    "compute_delta",
    "delta_dtype",
    "delta_names",
    "difference",
    "iter_delta",
    "load_tensors",
    "match_tensors",
    "open_pair",
    "read_pair",
    "read_pre",
    "tied_names",
]

Patterns = str | Iterable[str] | None
# Weights in any form load_tensors reads: a module, a state dict, a directory, a file or a hub id.
Weights = nn.Module | Mapping[str, Tensor] | str | os.PathLike | TensorSource


class DeltaMatch(NamedTuple):
    """One selected tensor: its name in the results and the names to read on each side (they differ only for tied
    tensors stored under another name of their group)."""

    name: str
    post_name: str
    pre_name: str


def delta_dtype(post_dtype: torch.dtype, pre_dtype: torch.dtype) -> torch.dtype:
    """The dtype ΔW is computed in: both dtypes promoted together and to at least float32.

    Example:
        >>> delta_dtype(torch.float32, torch.bfloat16)
        torch.float32
        >>> delta_dtype(torch.float64, torch.float32)
        torch.float64
    """
    return torch.promote_types(torch.promote_types(post_dtype, pre_dtype), torch.float32)


def _compile_patterns(patterns: Patterns, argument: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    elif isinstance(patterns, Iterable) and not isinstance(patterns, Mapping):
        patterns = list(patterns)
        if not patterns:
            raise ValueError(f"{argument}=[] selects nothing; pass None to apply no {argument} pattern.")
    else:
        raise ValueError(
            f"{argument} must be a regular expression (str) or a list of them, got {type(patterns).__name__}."
        )
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append(pattern)
            continue
        if not isinstance(pattern, str):
            raise ValueError(f"{argument} patterns must be str, got {pattern!r} of type {type(pattern).__name__}.")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                f"The {argument} pattern {pattern!r} is not a valid regular expression: {error}."
            ) from None
    return compiled


def _is_selected(names: Iterable[str], includes: list[re.Pattern], excludes: list[re.Pattern]) -> bool:
    """Whether a tensor with these names (several for a tied tensor) passes include and exclude."""
    names = list(names)
    if includes and not any(pattern.search(name) for pattern in includes for name in names):
        return False
    return not any(pattern.search(name) for pattern in excludes for name in names)


def _resolve(name: str, side: TensorSource, other: TensorSource) -> str | None:
    """The name under which ``side`` holds tensor ``name``: itself, or another name of its tied group on ``other``."""
    if name in side:
        return name
    if name in other:
        for member in other.group(name):
            if member in side:
                return member
    return None


def _exclude_suggestion(names: list[str]) -> str:
    if len(names) > 10:
        return "exclude=<regular expressions matching them>"
    return "exclude=r'^(" + "|".join(re.escape(name) for name in names) + ")$'"


def _count(items: list) -> str:
    return f"{len(items)} tensor" + ("" if len(items) == 1 else "s")


def _describe_patterns(include: Patterns, exclude: Patterns) -> str:
    return f"include={include!r}, exclude={exclude!r}"


def match_tensors(
    *, post: TensorSource, pre: TensorSource, include: Patterns = None, exclude: Patterns = None
) -> list[DeltaMatch]:
    """The tensors ΔW is computed for, in the post-trained model's order, after every check that needs no values.

    Args:
        post: the post-trained weights (see :func:`load_tensors`).
        pre: the pre-trained weights.
        include: regular expressions; only tensors with a name matching one of them (``re.search``) are selected.
        exclude: regular expressions; tensors with a name matching one of them are left out.

    Raises:
        ValueError: for invalid patterns, tensors present on one side only, shapes that differ, a tensor that is
            floating point on one side and integer on the other, or an empty selection.
    """
    includes = _compile_patterns(include, "include")
    excludes = _compile_patterns(exclude, "exclude")
    order: dict[str, None] = {}
    for source in (post, pre):
        for kept in source.keys():
            for name in source.group(kept):
                order.setdefault(name, None)

    matches: list[DeltaMatch] = []
    seen: set[tuple[str, str]] = set()
    missing_in_pre: list[str] = []
    missing_in_post: list[str] = []
    mismatched: list[tuple[str, torch.Size, torch.Size]] = []
    mixed: list[tuple[str, torch.dtype, torch.dtype]] = []  # floating point on one side only
    for name in order:
        pre_name = _resolve(name, pre, post)
        post_name = _resolve(name, post, pre)
        group = {name}
        if pre_name is not None:
            group.update(pre.group(pre_name))
        if post_name is not None:
            group.update(post.group(post_name))
        if not _is_selected(sorted(group), includes, excludes):
            continue
        if pre_name is None or post_name is None:
            present, present_name = (post, post_name) if pre_name is None else (pre, pre_name)
            assert present_name is not None, "every name in `order` is held by post or pre"
            if not present.dtype(present_name).is_floating_point or present.canonical(present_name) != name:
                continue  # integer buffers and aliases of tied tensors need no counterpart
            (missing_in_pre if pre_name is None else missing_in_post).append(name)
            continue
        key = (pre.canonical(pre_name), post.canonical(post_name))
        if key in seen:
            continue
        seen.add(key)
        pre_dtype, post_dtype = pre.dtype(pre_name), post.dtype(post_name)
        if not (pre_dtype.is_floating_point and post_dtype.is_floating_point):
            if pre_dtype.is_floating_point or post_dtype.is_floating_point:
                mixed.append((name, pre_dtype, post_dtype))
            continue  # integer and bool buffers on both sides are not weights
        pre_shape, post_shape = pre.shape(pre_name), post.shape(post_name)
        if pre_shape != post_shape:
            mismatched.append((name, pre_shape, post_shape))
            continue
        matches.append(DeltaMatch(name, post_name, pre_name))

    if missing_in_pre or missing_in_post:
        parts = []
        if missing_in_pre:
            parts.append(
                f"{_count(missing_in_pre)} of post ({post.description}) missing from pre "
                f"({pre.description}): {format_names(missing_in_pre)}"
            )
        if missing_in_post:
            parts.append(
                f"{_count(missing_in_post)} of pre ({pre.description}) missing from post "
                f"({post.description}): {format_names(missing_in_post)}"
            )
        raise ValueError(
            "The pre- and post-trained weights do not hold the same tensors "
            f"({_describe_patterns(include, exclude)}): " + "; ".join(parts) + ". Compare checkpoints of the same "
            f"architecture, or leave these tensors out with {_exclude_suggestion(missing_in_pre + missing_in_post)}."
        )
    if mismatched:
        shown = [f"{name} (pre {tuple(a)}, post {tuple(b)})" for name, a, b in mismatched]
        raise ValueError(
            f"Shapes differ between pre and post for {_count(mismatched)}: {format_names(shown)}. A resized "
            "vocabulary changes the embedding and output layers; leave such tensors out with "
            f"{_exclude_suggestion([name for name, _, _ in mismatched])}."
        )
    if mixed:
        shown = [f"{name} (pre {a}, post {b})" for name, a, b in mixed]
        raise ValueError(
            f"Floating point on one side and integer on the other for {_count(mixed)}: {format_names(shown)}. "
            "ΔW of such a pair is meaningless (a quantized checkpoint stores codes, not weights); dequantize it "
            "first, or leave these tensors out with "
            f"{_exclude_suggestion([name for name, _, _ in mixed])}."
        )
    if not matches:
        available = [name for name in post.keys() if name in pre]
        raise ValueError(
            f"{_describe_patterns(include, exclude)} select no floating-point tensor present in both pre "
            f"({pre.description}) and post ({post.description}). Available names ({len(available)}): "
            f"{format_names(available, limit=8) or 'none in common'}."
        )
    return matches


def check_tied_targets(names: Iterable[str], post: TensorSource) -> None:
    """Refuse two selected names that write into one tied tensor of the post-trained model.

    A tied tensor (an embedding shared with the LM head) is one tensor in the model; when the pre-trained weights
    (a state dict of copies, a checkpoint saved untied) or a mapping of edits hold it under two names, editing both
    would add two edits to one weight. Used by every path that edits a model: :func:`~lightning_delta.export.
    apply_edit_`, :class:`~lightning_delta.parametrize.EditedModel` and so the Riemann analysis.

    Example:
        >>> shared = torch.zeros(2)
        >>> check_tied_targets(["emb", "head"], load_tensors({"emb": shared, "head": shared}))
        Traceback (most recent call last):
        ...
        ValueError: head and emb are one tied tensor in the model but two tensors in the pre-trained weights (or the edit), so the edit is ambiguous. Give W_pre (or the edit) under one of the names only, e.g. without 'head', or leave the tensor out with exclude=r'^(head)$'.
    """
    targets: dict[str, str] = {}
    for name in names:
        target = post.canonical(name) if name in post else name  # unknown names are their callers' to report
        if target in targets:
            raise ValueError(
                f"{name} and {targets[target]} are one tied tensor in the model but two tensors in the pre-trained "
                f"weights (or the edit), so the edit is ambiguous. Give W_pre (or the edit) under one of the names "
                f"only, e.g. without {name!r}, or leave the tensor out with {_exclude_suggestion([name])}."
            )
        targets[target] = name


@contextmanager
def open_pair(*, post: Weights, pre: Weights) -> Iterator[tuple[TensorSource, TensorSource]]:
    """``(post, pre)`` as :class:`TensorSource` objects; those opened here are closed when the block ends.

    Raises:
        ValueError: naming the side ("pre" or "post") whose weights cannot be loaded (see :func:`load_tensors`).
    """
    with ExitStack() as stack:
        sources = []
        for source, side in ((pre, "pre"), (post, "post")):
            if isinstance(source, TensorSource):
                sources.append(source)
                continue
            try:
                opened = load_tensors(source)
            except ValueError as error:
                raise ValueError(f"Cannot load the {side}-trained weights: {error}") from error
            sources.append(stack.enter_context(opened))
        yield sources[1], sources[0]  # W_pre is loaded first: its errors come first


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, checked in chunks so that the boolean mask of a huge embedding stays small."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)  # a view for contiguous tensors, a copy otherwise
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(CHUNK_NUMEL))


def as_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}."
        ) from error


def read_pair(
    match: DeltaMatch, post: TensorSource, pre: TensorSource, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """``(W_post, W_pre)`` of one match in their stored dtypes, on ``device`` (default: the post tensor's).

    For a module the post tensor is the module's own (detached) weight when no move is needed, not a copy.

    Raises:
        ValueError: if either tensor is on the meta device (a model built without its weights).
    """
    w_post = check_real(post.get(match.post_name), match.name, "post", post)
    w_pre = check_real(pre.get(match.pre_name), match.name, "pre", pre)
    target = device if device is not None else w_post.device
    return w_post.to(target), w_pre.to(target)


def read_pre(match: DeltaMatch, pre: TensorSource, device: torch.device) -> Tensor:
    """W_pre of one match in its stored dtype, on ``device``, for a W_post already at hand (see :func:`read_pair`)."""
    return check_real(pre.get(match.pre_name), match.name, "pre", pre).to(device)


def check_real(tensor: Tensor, name: str, side: str, source: TensorSource) -> Tensor:
    """``tensor`` itself, unless it is on the meta device (shapes without values), which is refused naming it."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"W_{side} must hold real weights, but {name!r} of the {side}-trained weights ({source.description}) is "
            "on the meta device: a model built under torch.device('meta') or loaded without its weights. Give the "
            f"{side}-trained weights as a directory, a file, or a module whose weights are loaded."
        )
    return tensor


def difference(match: DeltaMatch, w_post: Tensor, w_pre: Tensor, post: TensorSource, pre: TensorSource) -> Tensor:
    """``W_post − W_pre`` in :func:`delta_dtype`, a new tensor.

    Raises:
        ValueError: if either weight holds NaN or inf, naming the tensor, the side and the counts. Non-finite inputs
            always give a non-finite difference (inf − inf is NaN), so only the difference is scanned on the fast path.
    """
    dtype = delta_dtype(w_post.dtype, w_pre.dtype)
    with torch.no_grad():
        delta = w_post.to(dtype) - w_pre.to(dtype)
    if all_finite(delta):
        return delta
    for tensor, side, source in ((w_pre, "pre", pre), (w_post, "post", post)):
        if not all_finite(tensor):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise ValueError(
                f"The {side}-trained tensor {match.name!r} ({source.description}) holds {nan} NaN and {inf} inf "
                f"values: the checkpoint is damaged or diverged. Use a healthy checkpoint, or leave the tensor out "
                f"with {_exclude_suggestion([match.name])}."
            )
    raise ValueError(
        f"W_post − W_pre overflows {dtype} for {match.name!r} although both weights are finite; the weights are "
        "too large to subtract in this dtype."
    )


class PairChecks:
    """The checks that need every selected pair, fed one pair at a time by :func:`iter_delta` and
    :func:`~lightning_delta.editing.iter_edited`: ΔW zero in every tensor (W_pre and W_post are the same weights), and
    W_pre and W_post stored at different precisions.

    A mixed-precision pair measures ``ΔW = W_post − W_pre`` of the stored values: the post-training change plus the
    rounding of the finer side to the coarser dtype. :meth:`warn_mixed_precision` says how large that rounding is
    against ‖ΔW‖, as ‖round(W_fine) − W_fine‖ / ‖ΔW‖ over the mixed tensors (the finer side rounded to the coarser
    dtype stands for the rounding the coarser side holds).
    """

    def __init__(self) -> None:
        self.count = 0
        self.nonzero = False
        self.mixed: dict[tuple[torch.dtype, torch.dtype], int] = {}  # (pre dtype, post dtype) -> tensors
        self.rounding_squared = 0.0
        self.delta_squared = 0.0

    def add(self, w_post: Tensor, w_pre: Tensor, delta: Tensor, whole: Tensor | None = None) -> None:
        """One pair; ``delta`` is ``W_post − W_pre`` of the same entries, ``whole`` the whole ΔW when they are one
        process's rows of a sharded tensor (so that every process finds ΔW zero or not alike)."""
        self.count += 1
        if not self.nonzero:
            self.nonzero = bool((delta if whole is None else whole).any())
        if w_pre.dtype == w_post.dtype:
            return
        key = (w_pre.dtype, w_post.dtype)
        self.mixed[key] = self.mixed.get(key, 0) + 1
        fine, coarse = sorted((w_pre, w_post), key=lambda tensor: torch.finfo(tensor.dtype).eps)
        with torch.no_grad():
            rounding = fine.to(coarse.dtype).to(delta.dtype) - fine.to(delta.dtype)
            self.rounding_squared += float(torch.linalg.vector_norm(rounding, dtype=torch.float64)) ** 2
            self.delta_squared += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2

    def check_not_zero(self, post: TensorSource, pre: TensorSource) -> None:
        """Raise if ΔW was zero in every pair: W_pre and W_post are the same weights."""
        if self.count and not self.nonzero:
            raise ValueError(
                f"ΔW = W_post − W_pre is zero in every one of the {self.count} selected tensors: the pre-trained "
                f"weights ({pre.description}) are the post-trained ones ({post.description}), so every edit changes "
                "nothing and every term is 0. Give the pre-trained model as W_pre (--model.pretrained, `pretrained=`)."
            )

    def warn_mixed_precision(self) -> None:
        """Warn once if some pairs had W_pre and W_post in different dtypes, with the rounding against ‖ΔW‖."""
        if not self.mixed or self.rounding_squared == 0:  # e.g. bf16 weights upcast to float32: no rounding
            return
        (pre_dtype, post_dtype), count = max(self.mixed.items(), key=lambda item: item[1])
        coarse = max((pre_dtype, post_dtype), key=lambda dtype: torch.finfo(dtype).eps)
        side = "W_pre" if coarse == pre_dtype else "W_post"
        share = (self.rounding_squared / self.delta_squared) ** 0.5 if self.delta_squared > 0 else float("inf")
        warnings.warn(
            f"W_pre is stored in {pre_dtype} and W_post in {post_dtype} for {count} of the {self.count} selected "
            f"tensors: ΔW = W_post − W_pre then holds {side}'s rounding to {coarse} besides the post-training change. "
            f"Rounding the other side to {coarse} moves it by {100 * share:.3g} % of ‖ΔW‖ over those tensors: the "
            "edit and the terms act on a ΔW about that far from the exact one. Give both models in the same dtype "
            "(e.g. the pre-trained one saved in the post-trained one's dtype, or both loaded in one dtype).",
            UserWarning,
            stacklevel=3,
        )


def delta_names(
    model: Weights, *, pretrained: Weights, include: Patterns = None, exclude: Patterns = None
) -> list[str]:
    """The names of the tensors :func:`iter_delta` would yield, checked but without computing any delta.

    Only metadata is read (names, shapes and dtypes); NaN / inf values are found when the tensors are read.

    Example:
        >>> pre = {"w": torch.zeros(2), "step": torch.tensor(3)}
        >>> post = {"w": torch.ones(2), "step": torch.tensor(4)}
        >>> delta_names(post, pretrained=pre)
        ['w']
    """
    with open_pair(post=model, pre=pretrained) as (post_source, pre_source):
        return [
            match.name for match in match_tensors(post=post_source, pre=pre_source, include=include, exclude=exclude)
        ]


def _generate(
    matches: list[DeltaMatch], post: TensorSource, pre: TensorSource, device: torch.device | None, stack: ExitStack
) -> Iterator[tuple[str, Tensor]]:
    checks = PairChecks()
    with stack:  # closes the files opened by iter_delta once the iteration ends or the generator is closed
        for match in matches:
            # The tuple is the only reference to the delta: once the consumer drops it, it is freed before the
            # next pair is read.
            yield match.name, _next_delta(match, post, pre, device, checks)
    checks.warn_mixed_precision()


def _next_delta(
    match: DeltaMatch, post: TensorSource, pre: TensorSource, device: torch.device | None, checks: PairChecks
) -> Tensor:
    w_post, w_pre = read_pair(match, post, pre, device)
    delta = difference(match, w_post, w_pre, post, pre)
    checks.add(w_post, w_pre, delta)
    return delta


def iter_delta(
    model: Weights,
    *,
    pretrained: Weights,
    include: Patterns = None,
    exclude: Patterns = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``(name, ΔW)`` with ΔW = W_post − W_pre for each selected tensor, one at a time.

    Names, shapes and the selection are checked when this is called; the tensors are read lazily as the iterator
    advances, and it holds no delta but the one it is yielding: memory is one tensor pair at a time.

    Args:
        model: the post-trained weights (W_post): an ``nn.Module``, a state dict, a model directory, a
            ``.safetensors`` / ``.bin`` file, a hub id or a :class:`TensorSource`.
        pretrained: the pre-trained weights (W_pre), in any of the same forms.
        include: regular expressions (``re.search`` on tensor names); only matching tensors are selected.
        exclude: regular expressions; matching tensors are left out.
        device: where the delta is computed; default the post-trained tensor's device (CPU for files).

    Shapes:
        each ΔW has its tensor's shape, in :func:`delta_dtype` (at least float32).

    Raises:
        ValueError: for an unsupported source, a path that does not exist, a directory without weights, invalid
            patterns, tensors present on one side only, shape mismatches, an empty selection (all at call time),
            and NaN or inf values (when the tensor is reached).

    Example:
        >>> pre = {"w": torch.tensor([1.0, 2.0])}
        >>> post = {"w": torch.tensor([1.5, 1.0], dtype=torch.bfloat16)}
        >>> [(name, delta.tolist(), delta.dtype) for name, delta in iter_delta(post, pretrained=pre)]
        [('w', [0.5, -1.0], torch.float32)]
    """
    device = as_device(device)
    stack = ExitStack()
    try:
        post_source, pre_source = stack.enter_context(open_pair(post=model, pre=pretrained))
        matches = match_tensors(post=post_source, pre=pre_source, include=include, exclude=exclude)
    except BaseException:
        stack.close()
        raise
    return _generate(matches, post_source, pre_source, device, stack)


def compute_delta(
    model: Weights, *, pretrained: Weights, include: Patterns = None, exclude: Patterns = None
) -> dict[str, Tensor]:
    """Every selected ΔW = W_post − W_pre at once: ``dict(iter_delta(model, pretrained=pretrained, ...))``.

    Holds all deltas in memory; prefer :func:`iter_delta` for large models. See :func:`iter_delta` for the arguments.

    Example:
        >>> compute_delta({"a": torch.ones(2), "b": torch.ones(1)},
        ...               pretrained={"a": torch.zeros(2), "b": torch.zeros(1)}, exclude="b")
        {'a': tensor([1., 1.])}
    """
    return dict(iter_delta(model, pretrained=pretrained, include=include, exclude=exclude))
