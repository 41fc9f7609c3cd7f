"""The handle of an attached edit: what :func:`~lightning_delta.attach.attach_edit` returns and the Riemann sweep
drives. :class:`~lightning_delta.parametrize.EditedModel` (a parametrization ``W_post + t·E`` on each edited tensor)
and :class:`~lightning_delta.sharded.ShardedEditedModel` (``W_post + t·E`` written into the rows of a model
sharded by FSDP2) are the two kinds."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["EditHandle"]


@runtime_checkable
class EditHandle(Protocol):
    """``W_post + t·E`` attached to ``model``'s tensors ``names`` (sorted), with one ``t`` for all of them."""

    model: nn.Module
    names: list[str]
    E_dtype: str
    t: float  # where :meth:`set_t` last put the tensors (0.0 at first)

    def __len__(self) -> int:
        """The number of edited tensors."""
        ...

    def original(self, name: str) -> Tensor:
        """W_post of tensor ``name`` (this process's rows on a sharded model)."""
        ...

    def E(self, name: str) -> Tensor:  # noqa: N802 (the paper's name)
        """``E = F(ΔW) − ΔW`` of tensor ``name`` (this process's rows on a sharded model)."""
        ...

    def weights_bytes(self) -> int:
        """The bytes of the edited tensors (this process's)."""
        ...

    def set_t(self, t: float) -> None:
        """Put every edited tensor at ``W_post + t·E``."""
        ...

    def pop_inner_products(self) -> Tensor:
        """``⟨∇L, E⟩`` per tensor (float64, order of :attr:`names`) left by backward; clears them."""
        ...

    def recompute_weights(self) -> AbstractContextManager[None]:
        """A context in which backward rebuilds ``W(t)`` instead of autograd keeping it."""
        ...

    def materialize(self, t: float = 1.0) -> nn.Module:
        """Leave ``W_post + t·E`` in plain weights and forget the edit."""
        ...

    def remove(self) -> nn.Module:
        """Give back W_post untouched and forget the edit."""
        ...
