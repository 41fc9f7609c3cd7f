"""The base class of every delta edit, its seeding and the argument checks shared by the edits.

An edit is a function ``F`` applied to each delta tensor ``ΔW = W_post − W_pre``; the edited model is
``W_pre + F(ΔW)`` (paper, section 3). Each edit lives in two layers:

* a pure function (``drop_and_rescale``, ``quantize_magnitudes``, ...): tensor in, tensor out, the input never
  modified, an explicit ``torch.Generator`` where randomness is needed;
* a :class:`DeltaEdit` subclass that holds the checked parameters, derives one generator per tensor from
  ``(seed, tensor name)`` with :func:`tensor_generator`, and maps the function over a state dict.

Every output has the delta's dtype promoted to at least float32 (:func:`output_dtype`): bf16 and float16 deltas give
float32, float64 deltas stay float64.
"""

from __future__ import annotations

import inspect
import math
import numbers
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["DeltaEdit", "Planning", "output_dtype", "single_threaded", "tensor_generator"]

_MASK64 = (1 << 64) - 1

# Entries handled per step by the edits that stream over a tensor (random draws, bucketing): bounds the temporary
# memory on 525M-entry embeddings. Part of the definition of the random streams, so changing it changes the masks.
CHUNK_NUMEL = 1 << 24


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a bijective 64-bit mixer whose every output bit depends on every
    input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def tensor_seed(seed: int, name: str) -> int:
    """The 63-bit seed of tensor ``name`` under run seed ``seed``.

    ``zlib.crc32`` of the UTF-8 name (never Python's ``hash``, which changes between processes) is mixed with the
    run seed by SplitMix64. Mixing matters: PyTorch's CPU generator only reads the low 32 bits of its seed, so
    ``seed << 32 | crc32`` would give every run seed the same masks.

    Example:
        >>> tensor_seed(0, "model.layers.0.mlp.up_proj.weight") == tensor_seed(0, "model.layers.0.mlp.up_proj.weight")
        True
        >>> tensor_seed(0, "a") != tensor_seed(1, "a")
        True
    """
    seed = check_seed(seed)
    if not isinstance(name, str):
        raise ValueError(f"The tensor name must be a str, got {name!r} of type {type(name).__name__}.")
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ zlib.crc32(name.encode("utf-8")))
    return mixed >> 1  # torch.Generator.manual_seed takes values below 2**63 on every device


def tensor_generator(seed: int, name: str, device: torch.device | str | None = None) -> torch.Generator:
    """A dedicated generator for tensor ``name``, seeded from the run seed and ``zlib.crc32(name)``.

    The same ``(seed, name, device type)`` gives the same random stream whatever order the tensors are visited in,
    the number of threads, or the process (every rank of a distributed run draws the same mask). The global RNG
    is neither read nor advanced. Streams differ between device types (CPU and CUDA generators are different
    algorithms), so an edit computed on CPU and on GPU draws different masks.

    Args:
        seed: the run seed, an int ``>= 0``.
        name: the tensor's name in the state dict.
        device: where the random numbers are drawn; the tensor's own device (``delta.device``).

    Raises:
        ValueError: if ``seed`` is not a non-negative int or ``name`` is not a str.

    Example:
        >>> g1 = tensor_generator(0, "w", "cpu")
        >>> g2 = tensor_generator(0, "w", "cpu")
        >>> torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
        True
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, name))
    return generator


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed CPU linear algebra on one thread, then restore the thread count.

    MKL's and OpenBLAS's LAPACK routines (SVD, QR) and large matrix products split their sums differently with
    different thread counts, so their results change in the last bits between ``torch.set_num_threads(1)`` and
    ``(2)``. The edits that call them run inside this context to give bit-identical results whatever the caller's
    thread count. ``torch.set_num_threads`` is process-wide: do not edit from several Python threads at once.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_dtype(delta: Tensor) -> torch.dtype:
    """The dtype of an edit's output: the delta's dtype promoted to at least float32.

    Example:
        >>> output_dtype(torch.zeros(2, dtype=torch.bfloat16))
        torch.float32
        >>> output_dtype(torch.zeros(2, dtype=torch.float64))
        torch.float64
    """
    return torch.promote_types(delta.dtype, torch.float32)


def promoted_copy(delta: Tensor) -> Tensor:
    """A fresh copy of ``delta`` in :func:`output_dtype`: the result of an edit that changes nothing."""
    return delta.to(dtype=output_dtype(delta), copy=True)


def flat_chunks(numel: int, chunk: int = CHUNK_NUMEL) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``, ``chunk`` entries each (the last one shorter)."""
    for start in range(0, numel, chunk):
        yield slice(start, min(start + chunk, numel))


def order_statistics(values: Tensor, ranks: list[int]) -> Tensor:
    """The values of ascending ranks ``ranks`` (0-based) of the 1-D tensor ``values``, without a full argsort.

    ``values`` is used as scratch space and left in an unspecified order: pass a tensor the caller owns (a fresh
    ``abs()``). On CPU one ``numpy.partition`` call finds every rank in place (introselect, no index tensor);
    elsewhere ``torch.kthvalue`` per rank when there are few ranks, one sort of the values otherwise.

    Shapes:
        - ``values``: ``(n,)`` float32 or float64. Output: ``(len(ranks),)``, same dtype and device.
    """
    values = values.detach()
    if not ranks:
        return values.new_empty(0)
    if values.device.type == "cpu":
        array = values.numpy()
        array.partition(ranks)  # in place: every listed rank lands at its sorted position
        return torch.from_numpy(array[ranks].copy())
    if len(ranks) <= 16:
        return torch.stack([torch.kthvalue(values, rank + 1).values for rank in ranks])
    index = torch.tensor(ranks, device=values.device)
    return torch.sort(values).values[index]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks. Each raises ValueError naming the edit, the argument, the value received and what is allowed.


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(owner: str, arg: str, value: Any) -> float:
    """``value`` as a finite float, else ValueError."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{owner}: `{arg}` must be a finite real number, got {arg}={value!r}.")
    return float(value)


def check_drop_rate(owner: str, value: Any, arg: str = "p") -> float:
    """A drop rate in ``[0, 1)``: ``p = 1`` would drop everything and divide by ``1 − p = 0``."""
    p = check_real(owner, arg, value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: `{arg}` must be in [0, 1), got {arg}={value!r}. Use a drop rate below 1.")
    return p


def check_int(owner: str, arg: str, value: Any, minimum: int) -> int:
    """An int (not a bool, not a float) ``>= minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{owner}: `{arg}` must be an int >= {minimum}, got {arg}={value!r}.")
    if value < minimum:
        raise ValueError(f"{owner}: `{arg}` must be an int >= {minimum}, got {arg}={value!r}.")
    return int(value)


def check_seed(value: Any, owner: str = "tensor_generator") -> int:
    """A seed: an int ``>= 0``."""
    return check_int(owner, "seed", value, minimum=0)


def check_choice(owner: str, arg: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: `{arg}` must be one of {list(choices)}, got {arg}={value!r}.")
    return value


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planning:
    """How :mod:`lightning_delta.planning` gives each tensor its own setting ``v`` of an edit
    (:meth:`DeltaEdit.at_setting` builds the edit at ``v``)."""

    unit: str  # what v counts, which prices a tensor (lightning_delta.planning.family): "bits", "density" or "rank"
    setting: str  # what v is, for messages and tables
    candidates: tuple[float, ...]  # the default candidate settings


class DeltaEdit:
    """An editing operation ``F`` on delta parameters: ``W_pre + F(ΔW)`` replaces ``W_post`` (paper, section 3.2).

    Subclasses set :attr:`name`, check their arguments in ``__init__`` (storing each under the argument's own name,
    which is what :meth:`config` and ``repr`` read back) and implement :meth:`edit_tensor` under
    ``@torch.no_grad()``: an edit is a constant of the Riemann sweep, so its outputs never require grad, even for
    deltas that do.

    What the rest of the package knows about an edit lives on its class: :attr:`label` and :attr:`shown` for figures
    and tables, :attr:`randomised` for the statistics over seeds, :attr:`planning` for :mod:`lightning_delta.planning`.
    The class methods read them for one configuration (``edit.config()``, or a results row's ``edit``), where an
    argument changes the answer (DARE's ``rescale=False`` is drop only).

    Shapes:
        - ``deltas``: a mapping from tensor name to ``ΔW`` of any shape and floating dtype.
        - output: a dict with the same keys in the same order; each value has its delta's shape and the delta's
          dtype promoted to at least float32, on the delta's device.

    Args of ``__call__``:
        deltas: ``{name: ΔW}``; never modified.
        gradients: ``{name: ∇L at W_post}``; needed only when :attr:`needs_gradients` is True.

    Raises:
        ValueError: if the edit needs gradients and ``gradients`` is missing or lacks some tensors (all listed).
    """

    name: ClassVar[str]
    label: ClassVar[str]  # how figures and tables name the edit: "DARE", "BitDelta", "EXPO"
    reference: ClassVar[str]  # where the paper (or the edit's own paper) defines it
    needs_gradients: bool = False  # a class attribute; PerTensor sets it per instance, from its edits
    randomised: ClassVar[bool] = False  # draws random numbers from `seed`: its results vary with the seed
    shown: ClassVar[tuple[str, ...] | None] = None  # the arguments labels and tables show; None: all but `seed`
    hidden_at: ClassVar[Mapping[str, Any]] = {}  # shown arguments a label leaves out at these values
    planning: ClassVar[Planning | None] = None  # how lightning_delta.planning sets it per tensor; None: not planned

    @classmethod
    def variant(cls, config: Mapping[str, Any]) -> str:
        """The name tables and figures give the edit that ``config`` describes: :attr:`name`, unless some value of
        an argument makes an edit of its own (DARE's ``rescale=False``: ``drop_only``)."""
        return cls.name

    @classmethod
    def draws_random(cls, config: Mapping[str, Any]) -> bool:
        """Whether the edit that ``config`` describes draws random numbers (its results vary with ``seed``):
        :attr:`randomised`, unless only some values of an argument draw (BitDelta's sampled magnitudes)."""
        return cls.randomised

    @classmethod
    def shown_arguments(cls, config: Mapping[str, Any]) -> list[str]:
        """The arguments of ``config`` that a label shows, in order: :attr:`shown` (every argument but ``name`` and
        ``seed`` where it is None), without those that are None or at their :attr:`hidden_at` value."""
        keys = cls.shown if cls.shown is not None else [key for key in config if key not in ("name", "seed")]
        return [
            key
            for key in keys
            if config.get(key) is not None and not (key in cls.hidden_at and config.get(key) == cls.hidden_at[key])
        ]

    @classmethod
    def at_setting(cls, value: float, seed: int = 0) -> DeltaEdit:
        """The edit at the per-tensor setting ``value`` of :attr:`planning` (``seed`` for a randomised edit)."""
        raise NotImplementedError(f"{cls.__name__} has no per-tensor setting (its `planning` is None).")

    def edit_tensor(self, name: str, delta: Tensor, gradient: Tensor | None = None) -> Tensor:
        """``F(ΔW)`` for one tensor; ``name`` seeds its random draws. Never modifies ``delta``."""
        raise NotImplementedError

    def __call__(
        self, deltas: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        if self.needs_gradients:
            missing = [key for key in deltas if gradients is None or key not in gradients]
            if missing:
                raise ValueError(
                    f"{type(self).__name__} needs the gradient of the loss at W_post for every edited tensor; "
                    f"missing for {len(missing)} tensor(s): {missing}. Pass `gradients={{name: grad}}`."
                )
        with torch.no_grad():
            return {
                key: self.edit_tensor(key, delta, None if gradients is None else gradients.get(key))
                for key, delta in deltas.items()
            }

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The constructor's argument names, in order: what :func:`build` accepts for this edit."""
        signature = inspect.signature(cls.__init__)
        return [key for key in signature.parameters if key != "self"]

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **constructor arguments}``; ``build(**edit.config())`` rebuilds an equal edit."""
        return {"name": self.name, **{key: getattr(self, key) for key in self.parameter_names()}}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeltaEdit):
            return NotImplemented
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.config().items())))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={getattr(self, key)!r}" for key in self.parameter_names())
        return f"{type(self).__name__}({arguments})"
