"""Peak memory per process of a Riemann analysis, from the model's ``config.json`` alone: ``lightning-delta estimate``.

The model is built from its config on the meta device (no weight is read or allocated) and the loss runs there on a
batch of the config's largest shape (``batch_size`` × ``max_length`` tokens, or images) while
:class:`LiveTensorBytes` adds up the bytes of every tensor the ops create and that is still alive. With s the
number of shards (N processes under a sharded strategy, FSDP2 through Lightning's ``ModelParallelStrategy`` or
``FSDPStrategy``; 1 under DDP), the peak per process is the largest of four phases::

    point    = (W + E + R) / s + C + G + A              one Riemann point, forward and backward
    evaluate = (W + E + R) / s + C + G + W_e + F        the accuracy at t = 0, 1 (only with an evaluator)
    gradient = (W + R + S) / s + G + A_all              GradientBiased's pass for ∇L(W_post) (only for it)
    attach   = (W + E + R + S) / s + T                  building E

- ``W``: the model's weights in its dtype; ``R``: the DPO reference model (loss ``dpo``), also held; and, in every
  phase (left out of the formulas below), the buffers of both (rotary tables, position ids), held whole.
- ``E``: ``F(ΔW) − ΔW`` of the edited tensors in their stored dtype (float32 for bf16 models, or the model's
  dtype with ``E_dtype="model"``; :func:`~lightning_delta.parametrize.stored_dtype`); 0 with
  ``E_dtype="on_the_fly"``, which instead makes one tensor's ``E`` wherever it is needed inside each point (counted
  in ``A``, where it is made).
- ``A``: the meta run's peak over forward and backward: saved activations, logits, each edited weight's gradient
  (freed as soon as it is made: backward leaves ``⟨∇W, E⟩`` in ``t.grad``, no weight-sized ``.grad``), and each
  ``W(t) = W_post + t·E`` (the sum in the promoted dtype and its cast) while its module runs forward and again
  when backward reads it, as ``EditedModel.recompute_weights`` rebuilds it (``RiemannCallback``'s default;
  ``recompute_weights=False`` keeps ``W(t)`` from the forward instead); each edited tensor's inner product
  ``⟨∇W, E⟩`` when its gradient is made (its float32 chunks and per-chunk sums, the larger of the CPU's and an
  accelerator's chunking), the float64 ``t`` of each edited tensor and its gradient; with ``E_dtype="on_the_fly"``,
  ``E`` made from W_pre (read in the weight's dtype), ΔW and F(ΔW) at each of those three places (an edit's working
  memory is counted as DARE's draws; TIES' sort or an SVD need more); for half-precision weights, a copy of the largest
  weight, which a CPU kernel holds inside one op in backward (the 44M Llama in bf16 at 1 × 128 tokens: its peak is
  that far above the tensors alive; the op was not pinned down). Where that copy is not at the peak (the same model
  at 2 × 256 tokens), or on a GPU, it is an over-count of at most that weight. Sharded, ``W(t)`` is
  written into the shards in place (:mod:`lightning_delta.sharded`): no ``W(t)``, and the gathered block's
  gradients. Each process runs its own batch: ``A`` is not divided by s.
- ``W_e`` and ``F``: unsharded, ``parametrize.cached()`` holds every edited ``W(t)`` (model dtype) while the
  evaluator runs; ``F`` is a forward of the loss without gradient (the cache of generated tokens is not counted).
- ``C`` and ``G`` (sharded only): the copy of W_post's rows of the edited tensors (W_e/s) and the rows of ∇W of one
  FSDP group (the largest: a block or the root group), which a hook turns into inner products and frees as soon as
  FSDP has reduce-scattered them; the gathered full weights: the root group (the tensors outside the repeated
  blocks) and two blocks, the one computing and the one prefetched, as FSDP2 with one ``fully_shard`` per block
  holds them.
- ``S`` and ``A_all``: ``GradientBiased``'s float32 sums of ∇L(W_post) for every weight, and ``A`` with every weight
  requiring a gradient.
- ``T``: one tensor's W_pre, ΔW and F(ΔW) in ΔW's dtype (:func:`~lightning_delta.delta.delta_dtype`), largest tensor
  (whole, also when sharded).

The peak is the same for every quadrature rule (``riemann.rule``): each point with a backward holds the same, and a
point without one (the t = 0 and t = 1 forwards of ``gauss`` and ``adaptive``, t = 1 of the left rule without the
trapezoid) holds less. The rule sets how many passes each batch takes, which the table prints.

Allocator caches and library workspaces are not counted; ``python -m benchmarks.memory`` measures how far this
lands from measured peaks (README, Memory).
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import import_module
from typing import Any

import torch
import transformers
from jsonargparse import Namespace
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_delta.callbacks.quadrature import check_rule, schedule
from lightning_delta.cli.parser import DeltaCLI
from lightning_delta.datamodules import ZeroShotClassifier, get_classnames
from lightning_delta.delta import delta_dtype, delta_names
from lightning_delta.edits.base import CHUNK_NUMEL
from lightning_delta.losses import DeltaLoss, build_loss
from lightning_delta.parametrize import (
    _INNER_PRODUCT_CHUNK_ACCELERATOR,
    _INNER_PRODUCT_CHUNK_CPU,
    check_E_dtype,
    stored_dtype,
)

__all__ = ["LiveTensorBytes", "MemoryEstimate", "estimate", "estimate_memory", "meta_model"]

GiB, MiB = 1 << 30, 1 << 20
TOKEN_DATA = ("GSM8KDataModule", "UltraFeedbackDataModule")
IMAGE_DATA = ("VisionDataModule",)
SHARDED_STRATEGIES = ("fsdp", "model_parallel", "FSDPStrategy", "ModelParallelStrategy")
GATHERED_BLOCKS = 2  # the block computing and the one prefetched
SCALARS = 64  # bytes of scalars (a loss, a count, a comparison's result) the meta run may not see where they peak
META_ATTENTION = "lightning_delta_meta"


class LiveTensorBytes(TorchDispatchMode):
    """Inside, :attr:`peak` is the largest sum of the bytes of the storages that ops made and that were alive at once.

    Storages that exist before (``existing``: weights, buffers, the batch) are not counted. A storage counts from
    the op that makes it until it is freed. On the meta device, reading a value (``.item()``, ``bool(mask.all())``)
    answers 1 (true): a full attention mask, which transformers then leaves out.

    Example:
        >>> with LiveTensorBytes() as live:
        ...     a = torch.ones(256, device="meta"); b = a * 2; del a, b; c = torch.ones(128, device="meta")
        >>> live.peak, live.current  # a and b (1 KiB each) alive at once; at the end only c
        (2048, 512)
    """

    def __init__(self, existing: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._known = {tensor.untyped_storage()._cdata for tensor in existing}
        self.current = self.peak = 0

    def _freed(self, key: int, size: int) -> None:
        self._known.discard(key)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 1
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self._known:
                    self._known.add(storage._cdata)
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._freed, storage._cdata, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return output


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (SDPA's flash or memory-efficient one, on GPU and CPU) allocates and saves:
    the output and a float32 log-sum-exp per query forward; the gradients of q, k, v backward. On meta, where
    SDPA would take its math path and materialise the (T, T) attention matrices that the fused kernels never hold."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor) -> Tensor:  # noqa: ANN001
        output = torch.empty_like(query)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def fused_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[Tensor, None]:
    """transformers' ``sdpa`` attention as the fused kernels hold it (shapes only): the attention implementation
    ``"lightning_delta_meta"`` of the meta models."""
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(META_ATTENTION, fused_attention)


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts (bytes, per process) of the formula in :mod:`lightning_delta.estimate`, and the phases' sums."""

    processes: int
    shards: int
    weights: int  # W / s
    E: int  # noqa: N815 (the paper's name)
    reference: int  # R / s
    sharded_copies: int  # C + G
    gathered: int  # G
    activations: int  # A
    evaluate_extra: int  # W_e (unsharded) + F, 0 without an evaluator
    gradient_sums: int  # S / s
    gradient_pass: int  # G + A_all, 0 but for GradientBiased
    attach_temporaries: int  # T
    buffers: int = 0  # B: the model's (and the DPO reference's) buffers, e.g. rotary tables, held whole
    # the riemann section's passes per batch (not memory: left out of comparisons); 0 when no rule was given
    rule: str = field(default="", compare=False)
    backward_passes: int = field(default=0, compare=False)  # forward+backward (the adaptive rule's first level)
    forward_passes: int = field(default=0, compare=False)  # forward alone (t = 0 and t = 1 without a backward)

    @property
    def point(self) -> int:
        return (
            self.weights
            + self.buffers
            + self.E
            + self.reference
            + self.sharded_copies
            + self.gathered
            + self.activations
        )

    @property
    def evaluate(self) -> int:
        held = (
            self.weights
            + self.buffers
            + self.E
            + self.reference
            + self.sharded_copies
            + self.gathered
            + self.evaluate_extra
        )
        return held if self.evaluate_extra else 0

    @property
    def gradient(self) -> int:
        held = self.weights + self.buffers + self.reference + self.gradient_sums + self.gradient_pass
        return held if self.gradient_pass else 0

    @property
    def attach(self) -> int:
        return self.weights + self.buffers + self.E + self.reference + self.gradient_sums + self.attach_temporaries

    @property
    def peak(self) -> int:
        return max(self.point, self.evaluate, self.gradient, self.attach)

    def table(self) -> str:
        """The parts, the phases and the peak, one line each, in GiB (MiB below 1 GiB)."""
        labels = {
            "weights": "W_post",
            "buffers": "buffers (rotary tables, ...)",
            "E": "E",
            "reference": "DPO reference",
            "sharded_copies": "W_post rows, one group's ∇W rows (FSDP)",
            "gathered": "gathered blocks (FSDP)",
            "activations": "activations, W(t), gradient",
            "evaluate_extra": "evaluator: cached W(t), forward",
            "gradient_sums": "GradientBiased gradient sums",
            "gradient_pass": "GradientBiased gradient pass",
            "attach_temporaries": "building E (one tensor)",
        }
        layout = f"sharded 1/{self.shards}" if self.shards > 1 else "each holds the whole model"
        lines = [f"Estimated peak memory per process ({self.processes} process(es), {layout}):"]
        lines += [
            f"  {labels[item.name]:<34} {_format(getattr(self, item.name))}"
            for item in fields(self)
            if item.name in labels
        ]
        lines += [
            f"  = {phase:<32} {_format(getattr(self, phase))}" for phase in ("point", "evaluate", "gradient", "attach")
        ]
        lines.append(f"  peak per process                   {_format(self.peak)}")
        if self.backward_passes:
            more = " (then more nodes while its error estimate is too large)" if self.rule == "adaptive" else ""
            lines.append(
                f"Per batch, rule {self.rule!r}: {self.backward_passes} forward+backward passes and "
                f"{self.forward_passes} forwards alone{more}; the peak is that of one point for every rule."
            )
        return "\n".join(lines)


def _format(size: int) -> str:
    return f"{size / GiB:10.2f} GiB" if size >= GiB else f"{size / MiB:10.1f} MiB"


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def meta_model(config: Any, dtype: torch.dtype, auto_class: str = "AutoModelForCausalLM") -> nn.Module:
    """The model of a transformers ``config`` (object, or directory / hub id of its ``config.json``) on meta, its
    attention the fused kernels' (:func:`fused_attention`)."""
    if not isinstance(config, transformers.PretrainedConfig):
        config = transformers.AutoConfig.from_pretrained(str(config))
    config = copy.deepcopy(config)
    config._attn_implementation = META_ATTENTION
    for name in getattr(config, "sub_configs", {}):
        if getattr(config, name, None) is not None:
            getattr(config, name)._attn_implementation = META_ATTENTION
    model_class = getattr(transformers, auto_class)
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # the Auto classes
            return model_class.from_config(config, dtype=dtype)
        return model_class(config).to(dtype)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the largest ``ModuleList``'s entries) that FSDP2 shards one by one."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda blocks: _bytes(blocks.parameters()))
    return list(largest)


def _made_E(weight: Tensor) -> Tensor:  # noqa: N802
    """``E`` as :class:`~lightning_delta.attach.RecomputedE` makes it on the fly: W_pre read in the weight's dtype,
    ``ΔW = W_post − W_pre`` in ΔW's dtype (the upcast copies included), ``F(ΔW)`` as one new tensor beside the edit's
    working memory, counted as DARE's (a float32 draw and a bool per entry, in chunks of ``CHUNK_NUMEL``), then
    ``F(ΔW) − ΔW``."""
    dtype = delta_dtype(weight.dtype, weight.dtype)
    w_pre = torch.empty_like(weight)
    delta = weight.detach().to(dtype) - w_pre.to(dtype)
    del w_pre
    edited = torch.empty_like(delta)
    chunk = min(delta.numel(), CHUNK_NUMEL)
    draws = torch.empty(chunk, dtype=torch.float32, device=delta.device)
    dropped = torch.empty(chunk, dtype=torch.bool, device=delta.device)
    del draws, dropped
    return (edited - delta).to(stored_dtype(weight.dtype, "float32"))


def _edited_weight(weight: Tensor, E: Tensor | None) -> Tensor:  # noqa: N803
    """``W(t) = W_post + t·E`` as the parametrization makes it: the sum in the promoted dtype, cast to the weight's;
    ``E`` the kept one, or ``None``: made now (:func:`_made_E`)."""
    E = _made_E(weight) if E is None else E  # noqa: N806
    return torch.add(weight.detach(), E, alpha=0.5).to(weight.dtype)


def inner_product_bytes(numel: int, grad_dtype: torch.dtype, E_dtype: torch.dtype) -> int:  # noqa: N803
    """The most bytes :func:`~lightning_delta.parametrize.inner_product` holds at once for one tensor, with the CPU's
    chunks or an accelerator's (whichever needs more): float32 copies of a chunk of the gradient and of ``E`` where
    they are not float32, and the chunk sums: one float32 scalar each, stacked, then as float64.

    Example:
        >>> inner_product_bytes(1 << 20, torch.float32, torch.float32)  # 16 CPU chunks: 16 × (4 + 4 + 8) + 8 bytes
        264
    """
    if grad_dtype == torch.float64 and E_dtype == torch.float64:
        return 8
    most = 0
    for chunk in (_INNER_PRODUCT_CHUNK_CPU, _INNER_PRODUCT_CHUNK_ACCELERATOR):
        chunks = math.ceil(numel / chunk)
        copies = 4 * min(chunk, numel) * ((grad_dtype != torch.float32) + (E_dtype != torch.float32))
        most = max(most, copies + 4 * chunks + 4, 16 * chunks + 8)
    return most


@contextlib.contextmanager
def _parametrized(model: nn.Module, edited: Mapping[str, Tensor], held: Mapping[int, Tensor]) -> Iterator[None]:
    """The edited weights' memory as ``EditedModel.recompute_weights`` spends it: each ``W(t)`` made while its module
    runs forward, and made again (not saved) when backward reads it; ``held`` maps ``id(weight)`` to its kept ``E``
    (none: ``E`` made on the fly)."""
    storages = {weight.untyped_storage()._cdata: weight for weight in edited.values()}
    owners = [
        module
        for module in model.modules()
        if any(id(weight) in map(id, edited.values()) for weight in module.parameters(recurse=False))
    ]
    running: dict[nn.Module, list[Tensor]] = {}  # the W(t) of each module while its forward runs

    def made(module: nn.Module, args: Any) -> None:
        running[module] = [
            _edited_weight(weight, held.get(id(weight)))
            for weight in module.parameters(recurse=False)
            if weight.untyped_storage()._cdata in storages
        ]

    def dropped(module: nn.Module, args: Any, output: Any) -> None:
        running.pop(module, None)

    def pack(tensor: Tensor) -> Any:
        weight = storages.get(tensor.untyped_storage()._cdata)
        return (weight, tensor.size(), tensor.stride(), tensor.storage_offset()) if weight is not None else tensor

    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, tuple):
            weight, size, stride, offset = packed
            return _edited_weight(weight, held.get(id(weight))).as_strided(size, stride, offset)
        return packed

    hooks = [
        hook
        for module in owners
        for hook in (module.register_forward_pre_hook(made), module.register_forward_hook(dropped))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        running.clear()


def _transient(
    model: nn.Module,
    loss: DeltaLoss,
    batch: Mapping[str, Tensor],
    edited: Mapping[str, Tensor],
    E_dtype: str,
    backward: bool,
    with_gradient: Iterable[str] = (),
) -> int:  # noqa: N803
    """``A`` (``backward``), ``F`` or ``A_all``: the meta run's peak of the tensors made beyond weights, buffers and
    batch, with ``W(t)`` for the ``edited`` tensors and a gradient for those and the ``with_gradient`` ones; for the
    ``edited`` ones backward also makes ``⟨∇W, E⟩`` (:func:`inner_product_bytes`, ``E`` made again on the fly) and
    the gradient of their ``t``, held to the end of the point."""
    hooks = []
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    held = (
        {}
        if E_dtype == "on_the_fly"
        else {  # the kept E, there before the point (not counted here)
            id(weight): torch.empty(weight.shape, dtype=stored_dtype(weight.dtype, E_dtype), device=weight.device)
            for weight in edited.values()
        }
    )
    t_gradients: list[Tensor] = []

    def freed(parameter: Tensor) -> None:
        parameter.grad = None

    def inner_product(parameter: Tensor) -> None:  # what _AddScaledEdit / _AddRecomputedEdit.backward make
        E = held.get(id(parameter))  # noqa: N806
        E = _made_E(parameter) if E is None else E  # noqa: N806
        assert parameter.grad is not None  # a hook after the gradient's accumulation
        scratch = torch.empty(
            inner_product_bytes(E.numel(), parameter.grad.dtype, E.dtype), dtype=torch.uint8, device=parameter.device
        )
        del scratch, E
        t_gradients.append(torch.zeros((), dtype=torch.float64, device=parameter.device))
        parameter.grad = None

    with_gradient = set(edited) | set(with_gradient)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(backward and name in with_gradient)
        if backward and name in with_gradient:
            hooks.append(parameter.register_post_accumulate_grad_hook(inner_product if name in edited else freed))
    existing = [
        *model.parameters(),
        *model.buffers(),
        *loss.parameters(),
        *loss.buffers(),
        *batch.values(),
        *held.values(),
    ]
    recompute = _parametrized(model, edited, held) if backward else contextlib.nullcontext()
    try:
        with LiveTensorBytes(existing) as live, torch.set_grad_enabled(backward), recompute:
            output = loss(model, loss.prepare(dict(batch)))
            if backward:
                output.total.backward()
            del output
            t_gradients.clear()
    finally:
        for hook in hooks:
            hook.remove()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
    return live.peak


def estimate_memory(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    loss: str | DeltaLoss = "causal_lm",
    include: Any = None,
    exclude: Any = None,
    E_dtype: str = "float32",  # noqa: N803 (the paper's name)
    processes: int = 1,
    sharded: bool = False,
    gradient_sums: bool = False,
    evaluator: bool = False,
) -> MemoryEstimate:
    """The peak memory per process of a Riemann analysis of ``model`` (on the meta device) on ``batch``.

    Args:
        model: the post-trained model on the meta device (:func:`meta_model`).
        batch: one batch of the largest shape, meta tensors, as the loss reads it.
        loss: ``"causal_lm"``, ``"classification"``, or a loss module (``dpo``: a ``DPOLoss`` whose reference is a
            meta model, counted in ``R``).
        include, exclude: the edited tensors, as for ``DeltaEditModule``.
        E_dtype: ``"float32"``, ``"model"`` or ``"on_the_fly"``.
        processes: N, the processes of the run; ``sharded``: whether weights, E and the reference are split 1/N.
        gradient_sums: the edit needs ∇L(W_post) (``GradientBiased``).
        evaluator: the accuracy is measured at t = 0 and t = 1 (an evaluator is set).

    Raises:
        ValueError: a model not on meta, ``processes`` < 1, an unknown ``E_dtype``.
    """
    check_E_dtype(E_dtype)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be a whole number >= 1 (devices × nodes), got {processes!r}.")
    if any(tensor.device.type != "meta" for tensor in model.parameters()):
        raise ValueError("estimate_memory takes a model on the meta device (lightning_delta.estimate.meta_model).")
    loss = build_loss(loss) if isinstance(loss, str) else loss
    shards = processes if sharded else 1
    parameters = dict(model.named_parameters())
    edited = {
        name: parameters[name]
        for name in delta_names(model, pretrained=model, include=include, exclude=exclude)
        if name in parameters
    }

    def rebuilt(weight: Tensor) -> int:
        summed = torch.promote_types(weight.dtype, stored_dtype(weight.dtype, E_dtype))
        return weight.numel() * (_size(summed) + (weight.element_size() if summed != weight.dtype else 0))

    on_the_fly = E_dtype == "on_the_fly"
    if on_the_fly and shards > 1:
        raise ValueError("E_dtype='on_the_fly' is not available on a sharded model; estimate E_dtype='model'.")
    E = (
        0
        if on_the_fly
        else sum(weight.numel() * _size(stored_dtype(weight.dtype, E_dtype)) for weight in edited.values())
    )
    largest = max(edited.values(), key=Tensor.numel, default=None)
    gathered = gradient_rows = 0
    if shards > 1:
        blocks = sorted((_bytes(block.parameters()) for block in _blocks(model)), reverse=True)
        root = _bytes(parameters.values()) - sum(blocks)
        gathered = root + sum(blocks[:GATHERED_BLOCKS])
        gradient_rows = math.ceil(max([root, *blocks[:1]]) / shards)
    reference = getattr(loss, "reference", None)
    edited_bytes = _bytes(edited.values())
    if shards > 1:  # W(t) written into the shards: no parametrization, a gradient for each edited tensor
        activations = _transient(model, loss, batch, {}, E_dtype, backward=True, with_gradient=edited)
    else:
        activations = _transient(model, loss, batch, edited, E_dtype, backward=True)
    activations += 8 * len(edited)  # the float64 t of each edited tensor, a parameter of its parametrization
    activations += SCALARS  # a few scalars the meta run does not place (4 bytes short on the 44M Llama on the fly)
    if largest is not None and largest.element_size() == 2:  # a CPU kernel's copy of a half-precision matrix
        activations += _bytes([max(parameters.values(), key=Tensor.numel)])
    sums = gradient_pass = 0
    if gradient_sums:
        sums = sum(weight.numel() * (8 if weight.dtype == torch.float64 else 4) for weight in parameters.values())
        every_weight = _transient(model, loss, batch, {}, E_dtype, backward=True, with_gradient=parameters)
        gradient_pass = gathered + every_weight
    one_tensor = 0 if largest is None else 3 * largest.numel() * _size(delta_dtype(largest.dtype, largest.dtype))
    evaluate_extra = 0
    if evaluator:  # on the fly, each cached W(t) is made from an E made then (one tensor's T at a time)
        cached = 0 if shards > 1 else edited_bytes + max(map(rebuilt, edited.values()), default=0)
        cached += one_tensor if on_the_fly else 0
        evaluate_extra = cached + _transient(model, loss, batch, edited, E_dtype, backward=False)
    return MemoryEstimate(
        processes=processes,
        shards=shards,
        weights=math.ceil(_bytes(parameters.values()) / shards),
        E=math.ceil(E / shards),
        reference=math.ceil(_bytes(reference.parameters()) / shards) if reference is not None else 0,
        sharded_copies=math.ceil(edited_bytes / shards) + gradient_rows if shards > 1 else 0,
        gathered=gathered,
        activations=activations,
        evaluate_extra=evaluate_extra,
        gradient_sums=math.ceil(sums / shards),
        gradient_pass=gradient_pass,
        attach_temporaries=one_tensor,
        buffers=_bytes(model.buffers()) + (_bytes(reference.buffers()) if reference is not None else 0),
    )


# ----------------------------------------------------------------------------------------------- from a config
def _dtype(name: Any, precision: Any, config: Any) -> torch.dtype:
    """The model's dtype: ``model.dtype``, else a ``*-true`` precision's, else the one its ``config.json`` stores."""
    if name is None and isinstance(precision, str) and precision.endswith("-true"):
        name = {"bf16": "bfloat16", "16": "float16", "32": "float32", "64": "float64"}.get(precision[:-5])
    if name is None:
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype {name!r} is not a torch dtype; use bfloat16, float16, float32 or float64.")
    return dtype


def _processes(trainer: Namespace) -> int:
    """The processes of a run: ``trainer.devices`` × ``trainer.num_nodes``. ``devices: auto`` (Lightning's default,
    what a ``validate`` run writes) and ``-1`` count the devices of this machine, as Lightning would: every GPU for a
    GPU accelerator, one process on the CPU."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        devices = _auto_devices(trainer.get("accelerator", "auto"))
        print(
            f"trainer.devices {trainer.get('devices')!r}: {devices} process(es) per node, as Lightning would start "
            "on this machine (--processes N for another count)."
        )
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"trainer.devices is {devices!r}: the estimate needs the number of processes; set "
            "trainer.devices to a number (e.g. --processes 8 for 8 GPUs)."
        )
    return devices * int(nodes)


def _auto_devices(accelerator: Any) -> int:
    """The devices Lightning's ``devices="auto"`` takes on this machine for ``accelerator``."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    name = _class_name(accelerator).lower() if accelerator is not None else "auto"
    if name in ("gpu", "cuda", "cudaaccelerator") or (name == "auto" and CUDAAccelerator.is_available()):
        return CUDAAccelerator.auto_device_count()
    return CPUAccelerator.auto_device_count()


def _sharded(strategy: Any) -> bool:
    name = strategy.get("class_path", "") if isinstance(strategy, (Namespace, dict)) else str(strategy or "")
    return any(name == key or name.endswith("." + key) or name.startswith(key + "_") for key in SHARDED_STRATEGIES)


def _class_name(value: Any) -> str:
    path = value.get("class_path", "") if isinstance(value, (Namespace, dict)) else str(value)
    return path.rsplit(".", 1)[-1]


def _edit_needs_gradients(edit: Any) -> bool:
    module, _, name = str(edit.get("class_path", "") if isinstance(edit, (Namespace, dict)) else edit).rpartition(".")
    return bool(module) and bool(getattr(getattr(import_module(module), name, None), "needs_gradients", False))


def _meta_zero_shot(init_args: Namespace, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """A :class:`~lightning_delta.datamodules.ZeroShotClassifier` on meta (CLIP's vision tower and projection from
    ``clip``'s config, a head of its classes; no tokenizer, no text forward) and its image size."""
    # a CLIPModel, read as Any: transformers types its config's vision_config (also dict or None) and image_size
    # (also a pair) wider than a CLIP config fills them
    clip: Any = meta_model(init_args.clip, dtype, "CLIPModel")
    classnames = init_args.get("classnames") or get_classnames(init_args.task, init_args.get("root"))
    classifier = ZeroShotClassifier.__new__(ZeroShotClassifier)
    nn.Module.__init__(classifier)
    classifier.vision_model, classifier.visual_projection = clip.vision_model, clip.visual_projection
    projection = clip.visual_projection.weight
    classifier.register_buffer(
        "head", torch.empty(len(classnames), projection.shape[0], dtype=dtype, device="meta"), persistent=False
    )
    classifier.register_buffer("logit_scale", torch.empty((), dtype=dtype, device="meta"), persistent=False)
    return classifier, clip.config.vision_config.image_size


def _batch(data: Namespace, loss: str, image_size: int | None) -> dict[str, torch.Tensor]:
    """A meta batch of the data's largest shape: ``batch_size`` rows of ``max_length`` tokens, or of images."""
    name, arguments = _class_name(data), data.get("init_args") or Namespace()
    size = arguments.get("batch_size")
    if name in TOKEN_DATA:
        shape = (size, arguments.get("max_length"))
        tokens = {
            "input_ids": torch.zeros(shape, dtype=torch.long, device="meta"),
            "attention_mask": torch.ones(shape, dtype=torch.long, device="meta"),
            "labels": torch.zeros(shape, dtype=torch.long, device="meta"),
        }
        if loss == "dpo":
            return {f"{side}_{key}": value for side in ("chosen", "rejected") for key, value in tokens.items()}
        return tokens
    if name in IMAGE_DATA and image_size is not None:
        return {
            "pixel_values": torch.zeros(size, 3, image_size, image_size, device="meta"),
            "labels": torch.zeros(size, dtype=torch.long, device="meta"),
        }
    raise ValueError(
        f"The estimate knows the batch shapes of {', '.join(TOKEN_DATA + IMAGE_DATA)} (with a ZeroShotClassifier for "
        f"images), not of data {data.get('class_path', data)!r} with model {loss!r}; for another DataModule call "
        "lightning_delta.estimate.estimate_memory with a meta batch of its shape."
    )


def estimate(
    model: dict,
    data: dict,
    trainer: dict | None = None,
    edit: dict | str | None = None,
    riemann: dict | None = None,
    sweep: dict | None = None,
    seed_everything: int | bool | None = None,
    processes: int | None = None,
    ckpt_path: str | None = None,
    verbose: bool | None = None,
    weights_only: bool | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory per process of ``validate`` or ``sweep`` on a config, from the model's config.json.

    Give the config file that ``validate`` reads (``--config configs/llama3-8b-instruct-gsm8k.yaml``), the one a
    ``validate`` run writes (``lightning_logs/version_0/config.yaml``) or its ``--print_config`` output; only the
    models' ``config.json`` files are read (from a local directory, or downloaded alone from the hub). The batch is
    the data's largest (``batch_size`` × ``max_length``), the dtype ``model.dtype``, the processes
    ``trainer.devices`` × ``trainer.num_nodes`` (or ``--processes``), sharded under an FSDP strategy (``fsdp``,
    ``model_parallel`` or their classes). The formula is in the docstring of :mod:`lightning_delta.estimate`.

    Args:
        model: the config's ``model`` section (the models' directories or hub ids, dtype, E_dtype, loss, include).
        data: its ``data`` section (the DataModule: batch_size and max_length, or the images' size).
        trainer: its ``trainer`` section (devices, num_nodes, strategy, precision).
        edit: its ``edit`` section (GradientBiased adds its gradient sums).
        riemann: its ``riemann`` section: the rule and its points give the passes per batch (not the peak).
        sweep: its ``sweep`` section (read by sweep, not by the estimate).
        seed_everything: read by validate, not by the estimate.
        processes: the number of processes, instead of the trainer's devices × nodes (``devices: auto``: the devices
            Lightning would use on this machine).
        ckpt_path: trainer.validate's argument, in the config validate writes; not read by the estimate.
        verbose: as ckpt_path.
        weights_only: as ckpt_path.
    """
    sections = {
        "model": model,
        "data": data,
        "trainer": trainer,
        "edit": edit,
        "riemann": riemann,
        "sweep": sweep,
        "seed_everything": seed_everything,
    }
    config = DeltaCLI(
        args={key: value for key, value in sections.items() if value is not None}, run=False, instantiate=False
    ).config
    section = config.model
    loss_name = section.loss if isinstance(section.loss, str) else _class_name(section.loss)
    if isinstance(section.model, str):
        dtype = _dtype(section.dtype, config.trainer.precision, transformers.AutoConfig.from_pretrained(section.model))
        network, image_size = meta_model(section.model, dtype), None
    elif _class_name(section.model) == "ZeroShotClassifier":
        dtype = _dtype(section.dtype, config.trainer.precision, None)
        network, image_size = _meta_zero_shot(section.model.init_args, dtype)
    else:
        raise ValueError(
            f"The estimate builds a causal LM from a directory or hub id, or a ZeroShotClassifier; got "
            f"model {section.model!r}."
        )
    if loss_name == "dpo":
        loss = build_loss("dpo", reference=meta_model(section.pretrained, dtype))
    elif loss_name in ("causal_lm", "classification"):
        loss = build_loss(loss_name)
    else:
        raise ValueError(f"The estimate runs the losses causal_lm, classification and dpo; got {section.loss!r}.")
    result = estimate_memory(
        network,
        _batch(config.data, loss_name, image_size),
        loss,
        section.include,
        section.exclude,
        section.E_dtype,
        processes if processes is not None else _processes(config.trainer),
        _sharded(config.trainer.strategy),
        _edit_needs_gradients(config.edit),
        section.get("evaluator") is not None or getattr(loss, "evaluator", None) is not None,
    )
    rule = config.riemann.rule
    num_points, trapezoid = check_rule(
        rule, config.riemann.num_points, config.riemann.trapezoid, config.riemann.tolerance
    )
    points = schedule(rule, num_points, trapezoid)
    result = replace(
        result, rule=rule, backward_passes=points.passes, forward_passes=len(points.points) - points.passes
    )
    print(result.table())
    return result
