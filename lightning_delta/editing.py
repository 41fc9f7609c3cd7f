"""Making ``F(ΔW)`` and ``E = F(ΔW) − ΔW``, one tensor at a time: :func:`edit_one` takes the steps for one tensor
(read W_pre, difference ΔW, apply the edit, check it) and :func:`iter_edited` for every selected tensor, with every
check that needs the whole selection. Every path that edits goes through them: writing the edited model
(:func:`lightning_delta.export.apply_edit_`), writing ``F(ΔW)`` compressed (:mod:`lightning_delta.compress`), and
attaching ``E`` for the Riemann analysis (:func:`lightning_delta.attach.attach_edit`: ``E`` kept, made on the fly, or
this process's rows of a model sharded by FSDP2).

Names: the *edit* is the operation F (an object of :mod:`lightning_delta.edits`, or a mapping of ready-made ``E``
tensors), *edited* is ``F(ΔW)``, and ``E = F(ΔW) − ΔW`` is what the model moves by (the paper's ΔW̃).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_delta.delta import (
    DeltaMatch,
    PairChecks,
    Patterns,
    Weights,
    all_finite,
    as_device,
    check_real,
    check_tied_targets,
    delta_dtype,
    difference,
    match_tensors,
    open_pair,
    read_pair,
    read_pre,
)
from lightning_delta.edits import EDITS
from lightning_delta.sharded import gather_rows, row_range
from lightning_delta.sources import TensorSource, format_names

__all__ = ["EditOperation", "EditedTensor", "check_edit", "check_edited", "edit_delta", "edit_one", "iter_edited"]


class EditOperation(Protocol):
    """An editing operation F: what :func:`check_edit` accepts as one (every :class:`~lightning_delta.edits.DeltaEdit`
    is one)."""

    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        """``F(ΔW)`` for one tensor."""
        ...


Edit = EditOperation | Mapping[str, Tensor]  # F, or name -> E = F(ΔW) − ΔW


class EditedTensor(NamedTuple):
    """One selected tensor after the edit.

    For a parameter sharded by FSDP2, ``rows`` are this process's rows ``(start, stop)``: ``w_post`` and ``w_pre``
    hold only those (``w_post`` the parameter's own local rows), ``delta`` and ``edited`` are whole.
    """

    name: str  # its name in results (a tied tensor under its first name)
    w_post: Tensor  # W_post: for a module, the module's own tensor
    w_pre: Tensor | None  # W_pre in its stored dtype, on the tensor's device (None: let go before the edit ran)
    delta: Tensor  # ΔW = W_post − W_pre in delta_dtype (at least float32)
    edited: Tensor  # F(ΔW): the tensor's shape, finite, in the delta's dtype or wider
    rows: tuple[int, int] | None = None  # this process's rows of a sharded parameter

    def E(self, dtype: torch.dtype) -> Tensor:  # noqa: N802 (the paper's name)
        """``E = F(ΔW) − ΔW`` in ``dtype``: what the model moves by from W_post to the edited model."""
        return (self.edited - self.delta).to(dtype)


def check_edit(edit: Any) -> None:
    """Refuse anything but an editing operation (``edit_tensor``) or a mapping of ``E`` tensors, naming the edits."""
    if isinstance(edit, Mapping) or callable(getattr(edit, "edit_tensor", None)):
        return
    known = ", ".join(f"{cls.__name__} ({name!r})" for name, cls in EDITS.items())
    hint = ""
    if isinstance(edit, str):
        hint = (
            f" For a name, build the operation: lightning_delta.edits.build({edit!r}, ...)"
            if edit in EDITS
            else f" {edit!r} is not an edit name"
        )
    raise ValueError(
        f"edit must be an editing operation of lightning_delta.edits or a mapping from tensor names to "
        f"E = F(ΔW) − ΔW tensors; got {type(edit).__name__} {edit!r}.{hint} The operations are: {known}."
    )


def _check_edit_mapping(edit: Mapping[str, Any], matches: list[DeltaMatch], post: TensorSource) -> None:
    """Every name of a mapping ``edit`` is a selected tensor and holds a tensor of its shape."""
    shapes = {match.name: post.shape(match.post_name) for match in matches}
    unknown = [name for name in edit if name not in shapes]
    if unknown:
        raise ValueError(
            f"edit has tensors that are not among the selected delta tensors: {format_names(unknown)}. Selected "
            f"({len(shapes)}): {format_names(shapes, limit=8)}. Use the names the delta is computed under (see "
            "lightning_delta.delta.delta_names; a tied tensor appears under its first name), or widen include= / "
            "exclude=."
        )
    bad = [
        f"{name} ({tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}, expected "
        f"{tuple(shapes[name])})"
        for name, value in edit.items()
        if not isinstance(value, Tensor) or value.shape != shapes[name]
    ]
    if bad:
        raise ValueError(f"edit must map each name to a tensor of the delta's shape: {format_names(bad)}.")


def iter_edited(
    post: Weights,
    *,
    pre: Weights,
    edit: Edit,
    include: Patterns = None,
    exclude: Patterns = None,
    gradients: Mapping[str, Tensor] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[EditedTensor]:
    """Each selected tensor with its ``F(ΔW)``, read, differenced and edited one at a time (no gradient is taken).

    Everything that needs no values is checked before the first tensor is read: the edit, the selection
    (:func:`~lightning_delta.delta.match_tensors`), the names and shapes of a mapping edit, the gradients an edit
    needs, and that no tied tensor of ``post`` is selected twice
    (:func:`~lightning_delta.delta.check_tied_targets`). A mapping edit yields ``F(ΔW) = ΔW + E`` for its own
    names only.

    On a model sharded by FSDP2 each process reads only its own rows of W_pre (a slice of the memory-mapped file),
    subtracts them from its rows of W_post, and the processes gather ``ΔW`` whole (one all-gather per tensor): the
    edit then sees the tensor one process would see (BitDelta's mean, TIES' top k, a low-rank SVD, DARE's mask), and
    every process computes the same ``F(ΔW)``.

    Args:
        post, pre: W_post and W_pre, in any form :func:`~lightning_delta.delta.load_tensors` reads.
        edit: the operation F, or a mapping name -> ``E``.
        include, exclude: regular expressions selecting the tensors.
        gradients: name -> ∇L at W_post, for operations with ``needs_gradients``.
        device: where ΔW and F(ΔW) are computed; default each post-trained tensor's device.

    Once every tensor is read, a pair stored in two dtypes gets a warning with its rounding against ‖ΔW‖, and ΔW
    zero in every tensor (W_pre given as the post-trained weights) an error
    (:class:`~lightning_delta.delta.PairChecks`).

    Raises:
        ValueError: for each check above, an ``F(ΔW)`` of the wrong shape or with NaN / inf (when its tensor is
            reached), ΔW zero in every tensor (at the end, for an operation F), and every error of
            :func:`~lightning_delta.delta.iter_delta`.
    """
    check_edit(edit)
    if gradients is not None and not isinstance(gradients, Mapping):
        raise ValueError(f"gradients must be a mapping from tensor names to tensors, got {type(gradients).__name__}.")
    device = as_device(device)
    with open_pair(post=post, pre=pre) as (post_source, pre_source):
        matches = match_tensors(post=post_source, pre=pre_source, include=include, exclude=exclude)
        if isinstance(edit, Mapping):
            _check_edit_mapping(edit, matches, post_source)
            matches = [match for match in matches if match.name in edit]
        elif getattr(edit, "needs_gradients", False):
            missing = [match.name for match in matches if gradients is None or match.name not in gradients]
            if missing:
                raise ValueError(
                    f"{type(edit).__name__} needs the gradient of the loss at W_post for every edited tensor; missing "
                    f"for {len(missing)} tensors: {format_names(missing)}. Pass gradients={{name: grad}}."
                )
        check_tied_targets([match.post_name for match in matches], post_source)
        checks = PairChecks()
        with torch.no_grad():
            for match in matches:
                gradient = None if gradients is None or isinstance(edit, Mapping) else gradients.get(match.name)
                item = edit_one(
                    match, edit, post=post_source, pre=pre_source, gradient=gradient, device=device, checks=checks
                )
                check_edited(edit, item)
                yield item
                del item  # the consumer's reference is the only one left: freed once it drops the tensor
        checks.warn_mixed_precision()
        if not isinstance(edit, Mapping):  # ready-made E is an edit of its own, whatever ΔW is
            checks.check_not_zero(post_source, pre_source)


def edit_one(
    match: DeltaMatch,
    edit: Edit,
    *,
    post: TensorSource,
    pre: TensorSource,
    w_post: Tensor | None = None,
    gradient: Tensor | None = None,
    device: torch.device | None = None,
    checks: PairChecks | None = None,
    keep_pre: bool = True,
) -> EditedTensor:
    """One selected tensor read, differenced and edited: the steps of every path that edits.

    1. W_post is ``w_post`` when given (``E`` made on the fly passes the parametrization's original), else read from
       ``post``; W_pre is read from ``pre`` onto W_post's device (or ``device``). For a parameter sharded by FSDP2
       both are this process's rows, and ΔW is gathered whole from every process's rows.
    2. ``ΔW = W_post − W_pre`` in :func:`~lightning_delta.delta.delta_dtype`
       (:func:`~lightning_delta.delta.difference`), fed to ``checks``.
    3. ``F(ΔW)`` by :func:`edit_delta`; ``E`` is then :meth:`EditedTensor.E`.

    ``keep_pre=False`` lets W_pre go before the edit runs (the result's ``w_pre`` is ``None``): ``E`` made on the
    fly holds one tensor less while the edit works. No gradient is taken. ``F(ΔW)`` is checked by
    :func:`check_edited` in :func:`iter_edited`, once per tensor; ``E`` made on the fly is made by an edit checked
    there already (:func:`~lightning_delta.attach.attach_edit`).

    Raises:
        ValueError: W_pre on the meta device, NaN or inf in either weight.
    """
    shard = post.sharded(match.post_name) if w_post is None else None
    rows = None if shard is None or device is not None else row_range(shard)
    w_pre: Tensor | None  # None once let go (keep_pre=False)
    with torch.no_grad():
        if shard is not None and rows is not None:
            w_post, w_pre, delta = _read_rows(match, post, pre, shard, rows)
        else:
            if w_post is None:
                w_post, w_pre = read_pair(match, post, pre, device)
            else:
                w_pre = read_pre(match, pre, device if device is not None else w_post.device)
            delta = difference(match, w_post, w_pre, post, pre)
        if checks is not None:
            checks.add(w_post, w_pre, delta if rows is None else delta[rows[0] : rows[1]], whole=delta)
        if not keep_pre:
            w_pre = None
        return EditedTensor(match.name, w_post, w_pre, delta, edit_delta(edit, match.name, delta, gradient), rows)


def edit_delta(edit: Edit, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
    """``F(ΔW)`` of tensor ``name``: ``edit.edit_tensor(name, ΔW, ∇L)`` for an operation (``gradient``, ∇L at
    W_post, is gathered whole when it is a ``DTensor`` and moved to ΔW's device), ``ΔW + E`` for a mapping of ``E``.
    """
    if isinstance(edit, Mapping):
        return delta + edit[name].to(delta)
    if isinstance(gradient, DTensor):  # rows held by each process: gathered whole, in step
        gradient = gradient.full_tensor()
    gradient = None if gradient is None else gradient.to(delta.device)
    return edit.edit_tensor(name, delta, gradient)


def check_edited(edit: Edit, item: EditedTensor) -> None:
    """Refuse an ``F(ΔW)`` that is not a tensor of ΔW's shape, or holds NaN or inf, naming the tensor."""
    edited, delta = item.edited, item.delta
    if not isinstance(edited, Tensor) or edited.shape != delta.shape:
        got = f"shape {tuple(edited.shape)}" if isinstance(edited, Tensor) else type(edited).__name__
        raise ValueError(f"The edit returned {got} for {item.name}, expected a tensor of shape {tuple(delta.shape)}.")
    if not all_finite(edited):
        raise ValueError(f"The edit {type(edit).__name__} returned NaN or inf values for {item.name}.")


def _read_rows(
    match: DeltaMatch, post: TensorSource, pre: TensorSource, shard: DTensor, rows: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(W_post rows, W_pre rows, ΔW whole)`` of a parameter sharded by FSDP2: this process reads only its rows of
    W_pre, and ΔW is gathered from every process's rows. The finiteness check runs on the whole ΔW, so every
    process raises together (one raising alone would leave the others waiting in the next all-gather)."""
    w_post = shard.to_local()
    w_pre = check_real(pre.rows(match.pre_name, *rows), match.name, "pre", pre).to(w_post.device)
    dtype = delta_dtype(w_post.dtype, w_pre.dtype)
    delta = gather_rows(w_post.to(dtype) - w_pre.to(dtype), shard)
    if not all_finite(delta):
        difference(match, w_post, w_pre, post, pre)  # names the side when this process's rows hold the NaN / inf
        raise ValueError(
            f"W_post − W_pre of {match.name!r} holds NaN or inf in another process's rows: the "
            f"checkpoint is damaged or diverged, or leave the tensor out with exclude=."
        )
    return w_post, w_pre, delta
