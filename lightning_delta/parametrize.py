"""The edit as a parametrization: every edited tensor reads ``W(t) = W_post + t·E``.

One scalar ``t`` per tensor (all set together by :meth:`EditedModel.set_t`) is the only tensor that requires a
gradient, so a backward pass leaves ``∂L/∂t_k = ⟨∇_{W_k} L(W_post + tE), E_k⟩`` in ``t_k.grad``: every
per-tensor term of the Riemann sum from one backward pass (tested against explicit weight gradients), with no
weight-sized ``.grad`` buffer.

Memory: autograd would keep each materialised ``W(t)`` alive until backward (one more copy of every edited weight,
measured below). Under :meth:`EditedModel.recompute_weights` a saved-tensor hook stores a reference to the
parametrization instead and rebuilds ``W(t)`` in backward, one tensor at a time.

Why a parametrization rather than writing ``W(t)`` into the weights in place (with a post-accumulate-grad hook
that takes ``⟨grad, E⟩`` and frees the gradient): both give the same inner products (difference 0.0) at the same
cost, measured by ``python -m benchmarks.inplace`` (Llama, hidden 1024, 8 layers, 408 MiB of edited float32
weights, 512 tokens, 2 CPU threads, median of 5 points):

==========================================  ==============  ==================
variant                                     time per point  extra peak memory
==========================================  ==============  ==================
parametrization, ``recompute_weights``      1.36 s          +516 MiB
parametrization, ``W(t)`` saved             2.96 s (2.17×)  +870 MiB
in place, post-accumulate-grad hook         1.33 s (0.98×)  +525 MiB
==========================================  ==============  ==================

At equal speed and memory the parametrization is kept because the user's weights are never written: an error or
an interrupt mid-sweep leaves W_post intact (in place, it must be restored from a second copy), the user's
parameters never require a gradient or get a ``.grad`` (in place, each is allocated in backward and freed by the
hook), and a tied tensor is one parametrization shared by its modules.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_delta.delta import check_tied_targets, load_tensors
from lightning_delta.padding import true_embedding_gradients

__all__ = ["EditParametrization", "EditedModel", "OnTheFlyE"]


# Entries per float32 dot: a chunk's sum is accumulated by BLAS in float32, the chunk sums in float64. Small enough
# that the float32 part stays at the level of the gradient's own rounding, large enough for few Python steps; on
# accelerators larger chunks keep the number of kernel launches down.
_INNER_PRODUCT_CHUNK_CPU = 1 << 16
_INNER_PRODUCT_CHUNK_ACCELERATOR = 1 << 22


def inner_product(grad: Tensor, E: Tensor) -> Tensor:
    """``⟨grad, E⟩ = Σ_ij grad_ij · E_ij`` as a float64 scalar.

    float64 tensors: one float64 dot. Otherwise the flattened tensors are cut into chunks of 65,536 entries
    (4,194,304 on accelerators), each chunk's products summed by a float32 dot and the chunk sums added in float64:
    no tensor-sized temporary, and no float64 copy of the data. On the tiny Llama the worst tensor is 1.5e-6 off
    an exact float64 sum of the same products, against 3e-6 for float32 arithmetic itself
    (``python -m benchmarks.precision``).

    Example:
        >>> grad, E = torch.randn(100_000), torch.randn(100_000)
        >>> exact = torch.dot(grad.double(), E.double())
        >>> bool(abs(inner_product(grad, E) - exact) <= 1e-5 * torch.dot(grad.abs().double(), E.abs().double()))
        True
    """
    grad, E = grad.reshape(-1), E.reshape(-1)
    if grad.dtype == torch.float64 and E.dtype == torch.float64:
        return torch.dot(grad, E)
    chunk = _INNER_PRODUCT_CHUNK_CPU if grad.device.type == "cpu" else _INNER_PRODUCT_CHUNK_ACCELERATOR
    dots = [
        torch.dot(grad[start : start + chunk].float(), E[start : start + chunk].float())
        for start in range(0, grad.numel(), chunk)
    ]
    return torch.stack(dots).double().sum() if dots else torch.zeros((), dtype=torch.float64, device=grad.device)


class _AddScaledEdit(torch.autograd.Function):
    """``W_post + t·E`` cast to ``W_post``'s dtype; the gradient for ``t`` is ``⟨grad, E⟩`` summed in float64."""

    @staticmethod
    def forward(ctx, original: Tensor, E: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(E)
        return torch.add(original, E, alpha=float(t)).to(original.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (E,) = ctx.saved_tensors
        grad_t = inner_product(grad, E) if ctx.needs_input_grad[2] else None
        grad_original = grad if ctx.needs_input_grad[0] else None
        return grad_original, None, grad_t


class _AddRecomputedEdit(torch.autograd.Function):
    """``W_post + t·E`` with ``E = recompute(W_post)`` made in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx, original: Tensor, t: Tensor, recompute: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.recompute = recompute
        ctx.save_for_backward(original)
        return torch.add(original, recompute(original), alpha=float(t)).to(original.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (original,) = ctx.saved_tensors
        grad_t = inner_product(grad, ctx.recompute(original)) if ctx.needs_input_grad[1] else None
        grad_original = grad if ctx.needs_input_grad[0] else None
        return grad_original, grad_t, None


class EditParametrization(nn.Module):
    """``W(t) = W_post + t·E`` for one tensor; ``E`` is kept in float32 (float64 for float64 weights), or, with
    ``recompute``, not kept: ``E = recompute(W_post)`` is made again wherever it is needed (the forward, the
    backward's ``⟨grad, E⟩``, the rebuild of ``W(t)``) and dropped at once.

    Args:
        E: ``F(ΔW) − ΔW`` of this tensor, or ``None`` with ``recompute``.
        recompute: ``W_post -> E`` (see :class:`~lightning_delta.attach.RecomputedE`).
        device: where ``t`` lives when ``E`` is not kept.
    """

    E: Tensor | None  # a buffer: None exactly when ``recompute`` is given

    def __init__(
        self, E: Tensor | None, recompute: Callable[[Tensor], Tensor] | None = None, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("E", E, persistent=False)
        self.recompute = recompute
        self.t = nn.Parameter(torch.zeros((), dtype=torch.float64, device=E.device if E is not None else device))
        self.produced: dict[int, tuple[weakref.ref, EditParametrization, Tensor]] | None = None

    def forward(self, original: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # nothing to differentiate or save; at t = 0, W_post itself (no E read or made)
            t = float(self.t)
            return original if t == 0.0 else self.rebuild(original, t)
        if self.recompute is None:
            weight = _AddScaledEdit.apply(original, self.E, self.t)
        else:
            weight = _AddRecomputedEdit.apply(original, self.t, self.recompute)
        if self.produced is not None:
            self.produced[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), self, original)
        return weight

    def difference(self, original: Tensor) -> Tensor:
        """``E``: the kept tensor, or made now from ``original`` (W_post)."""
        if self.recompute is not None:
            return self.recompute(original)
        assert self.E is not None, "E is kept when it is not made again"
        return self.E

    def rebuild(self, original: Tensor, t: float) -> Tensor:
        with torch.no_grad():
            return torch.add(original, self.difference(original), alpha=t).to(original.dtype)


EDtype = Literal["float32", "model", "on_the_fly"]
E_DTYPES: tuple[str, ...] = get_args(EDtype)


class OnTheFlyE(Protocol):
    """``E`` of one tensor, not kept but made from W_post at each call (:class:`~lightning_delta.attach.RecomputedE`);
    ``shape`` is the tensor's."""

    shape: torch.Size

    def __call__(self, w_post: Tensor, /) -> Tensor: ...


def check_E_dtype(E_dtype: str) -> str:  # noqa: N802, N803
    """``E_dtype`` checked: ``"float32"``, ``"model"`` or ``"on_the_fly"``, else ValueError."""
    if E_dtype not in E_DTYPES:
        raise ValueError(
            f"E_dtype must be 'float32' (E in float32, float64 for float64 models), 'model' (E in each tensor's "
            f"own dtype, half the memory for bf16 models) or 'on_the_fly' (E not kept: made again from W_pre and the "
            f"edit wherever it is needed); got {E_dtype!r}."
        )
    return E_dtype


def stored_dtype(weight_dtype: torch.dtype, E_dtype: str) -> torch.dtype:  # noqa: N803
    """The dtype ``E`` is kept in for a weight of ``weight_dtype``.

    Example:
        >>> stored_dtype(torch.bfloat16, "float32"), stored_dtype(torch.bfloat16, "model")
        (torch.float32, torch.bfloat16)
    """
    if E_dtype == "model":
        return weight_dtype
    return torch.float64 if weight_dtype == torch.float64 else torch.float32  # "float32", and "on_the_fly" as made


class EditedModel:
    """Registers ``W_post + t·E`` on the named tensors of ``model`` and drives the shared ``t``: an
    :class:`~lightning_delta.handle.EditHandle`.

    Args:
        model: the post-trained model; its tensors are W_post.
        E: tensor name (as in ``model.state_dict()``) to its ``E = F(ΔW) − ΔW``, or to what makes it from W_post
            (:class:`OnTheFlyE`, under ``E_dtype="on_the_fly"``).
        aliases: a tensor name to the other names under which the same tensor is tied (an embedding and an
            LM head); by default found from the model. A tied tensor is edited once: all its modules share one
            parametrization.
        E_dtype: how ``E`` is kept: ``"float32"`` (float64 for float64 weights), or ``"model"``, each tensor's own
            dtype (half the memory of float32 for bf16 models; ``W_post + t·E`` is then added in that dtype), or
            ``"on_the_fly"``: not kept, each value of ``E`` a callable ``W_post -> E`` called wherever ``E`` is
            needed (:func:`~lightning_delta.attach.attach_edit` builds them).

    While attached, an edited ``nn.Embedding`` with ``padding_idx`` runs its forward without it, so that
    ``⟨∇L, E⟩`` has the padding row's share too (:mod:`lightning_delta.padding`); the module is unchanged after
    :meth:`remove` or :meth:`materialize`.

    Raises:
        ValueError: a name that is not a tensor of ``model``, an ``E`` of the wrong shape, two names of one tied
            tensor, an unknown ``E_dtype``.

    Example:
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> edited = EditedModel(lin, {"weight": torch.ones(2, 2)})
        >>> edited.set_t(1.0); bool(torch.equal(lin.weight, edited.original("weight") + 1))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        E: Mapping[str, Tensor | OnTheFlyE],
        aliases: Mapping[str, Sequence[str]] | None = None,
        E_dtype: str = "float32",  # noqa: N803 (the paper's name)
    ) -> None:
        self.E_dtype = check_E_dtype(E_dtype)
        self.t = 0.0  # where set_t put every edited tensor
        self.model = model
        self.on_remove: list[Callable[[], None]] = []  # called once the parametrizations are gone (closing files)
        self.names: list[str] = sorted(E)
        self.parametrizations: dict[str, EditParametrization] = {}
        self._owners: dict[str, list[tuple[nn.Module, str]]] = {}
        tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        source = load_tensors(model)  # its names, grouped by tied tensor
        aliases = aliases if aliases is not None else source.tied
        check_tied_targets(self.names, source)
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._padding = contextlib.ExitStack()
        try:
            self._register(model, E, tensors, aliases)
            owners = [module for modules in self._owners.values() for module, _ in modules]
            self._padding.enter_context(true_embedding_gradients(owners))  # the padding row's share of ⟨∇L, E⟩
        except BaseException:
            self.remove()  # nothing half-registered stays on the user's model
            raise
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for parametrization in self.parametrizations.values():
            parametrization.t.requires_grad_(True)

    def _register(
        self,
        model: nn.Module,
        E: Mapping[str, Tensor | OnTheFlyE],
        tensors: Mapping[str, Tensor],
        aliases: Mapping[str, Sequence[str]],
    ) -> None:
        for name in self.names:
            if name not in tensors:
                raise ValueError(
                    f"Edited tensor {name!r} is not a parameter or buffer of {type(model).__name__}; "
                    "the names of E must be the model's state_dict names."
                )
            target = tensors[name]
            difference = E[name]
            if difference.shape != target.shape:
                raise ValueError(
                    f"E for {name!r} has shape {tuple(difference.shape)}, the tensor {tuple(target.shape)}."
                )
            if isinstance(difference, Tensor):
                parametrization = EditParametrization(
                    difference.detach().to(device=target.device, dtype=stored_dtype(target.dtype, self.E_dtype))
                )
            else:
                parametrization = EditParametrization(None, recompute=difference, device=target.device)
            for full_name in [name, *aliases.get(name, ())]:
                module_name, _, attr = full_name.rpartition(".")
                module = model.get_submodule(module_name)
                parametrize.register_parametrization(module, attr, parametrization, unsafe=True)
                self.parametrizations[name] = parametrization
                self._owners.setdefault(name, []).append((module, attr))

    def __len__(self) -> int:
        return len(self.names)

    def original(self, name: str) -> Tensor:
        """W_post of tensor ``name``."""
        module, attr = self._owners[name][0]
        parametrizations = cast(nn.ModuleDict, module.parametrizations)  # what register_parametrization added
        return cast(parametrize.ParametrizationList, parametrizations[attr]).original

    def E(self, name: str) -> Tensor:  # noqa: N802 (the paper's name)
        """``E = F(ΔW) − ΔW`` of tensor ``name`` (made now when it is not kept)."""
        return self.parametrizations[name].difference(self.original(name))

    def weights_bytes(self) -> int:
        """The bytes of the edited tensors (one ``W(t)`` of each, as autograd would keep them)."""
        return sum(self.original(name).numel() * self.original(name).element_size() for name in self.names)

    def set_t(self, t: float) -> None:
        """Put every edited tensor at ``W_post + t·E``."""
        self.t = float(t)
        with torch.no_grad():
            for parametrization in self.parametrizations.values():
                parametrization.t.fill_(t)

    def pop_inner_products(self) -> Tensor:
        """``⟨∇L, E⟩`` per tensor (float64, shape ``(K,)``, order of :attr:`names`) left by backward; clears them."""
        values = []
        for name in self.names:
            t = self.parametrizations[name].t
            values.append(t.grad.detach().clone() if t.grad is not None else torch.zeros((), dtype=torch.float64))
            t.grad = None
        device = values[0].device if values else torch.device("cpu")
        return torch.stack([value.to(device) for value in values]) if values else torch.zeros(0, dtype=torch.float64)

    @contextlib.contextmanager
    def recompute_weights(self) -> Iterator[None]:
        """Inside, autograd saves no ``W(t)``: backward rebuilds each from ``W_post`` and ``E`` when it needs it."""
        produced: dict[int, tuple[weakref.ref, EditParametrization, Tensor]] = {}

        def pack(tensor: Tensor):
            storage = tensor.untyped_storage().data_ptr()
            entry = produced.get(storage)
            if entry is not None:
                weight = entry[0]()
                if weight is not None and weight.untyped_storage().data_ptr() == storage:
                    _, parametrization, original = entry
                    geometry = (tensor.size(), tensor.stride(), tensor.storage_offset())
                    return (_Rebuild, parametrization, original, parametrization.t.detach().item(), geometry)
            return tensor

        def unpack(packed):
            if isinstance(packed, tuple) and len(packed) == 5 and packed[0] is _Rebuild:
                _, parametrization, original, t, (size, stride, offset) = packed
                return parametrization.rebuild(original, t).as_strided(size, stride, offset)
            return packed

        for parametrization in self.parametrizations.values():
            parametrization.produced = produced
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            for parametrization in self.parametrizations.values():
                parametrization.produced = None

    def materialize(self, t: float = 1.0) -> nn.Module:
        """Write ``W_post + t·E`` into plain tensors and remove the parametrizations (tied tensors stay tied)."""
        self.set_t(t)
        for name in self.names:
            first, *others = self._owners[name]
            module, attr = first
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            for module, attr in others:  # they share the original, which now holds W(t)
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._detach()
        return self.model

    def remove(self) -> nn.Module:
        """Remove the parametrizations and give back W_post untouched."""
        for owners in self._owners.values():
            for module, attr in owners:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._detach()
        return self.model

    def _detach(self) -> None:
        self._padding.close()
        for parameter in self.model.parameters():
            parameter.requires_grad_(self._requires_grad.get(id(parameter), parameter.requires_grad))
        self.parametrizations.clear()
        self._owners.clear()
        self.names = []
        while self.on_remove:
            self.on_remove.pop()()


class _Rebuild:
    """Marker for a saved ``W(t)`` replaced by the means to rebuild it."""
