"""The edit on a model sharded by FSDP2 (``fully_shard``, as Lightning's ``ModelParallelStrategy`` applies it).

Each edited parameter is then a ``DTensor``: every process holds some rows of W_post. The edit is written into those
rows, ``W(t)_shard = W_post_shard + t·E_shard``, and FSDP itself gathers ``W(t)`` for each block's forward and
backward and reduce-scatters the gradient, so that each process receives, block by block, the rows of ∇W that
match its rows of E (and turns them into the inner product at once, in a post-accumulate-grad hook that FSDP calls
after each reduce-scatter, so no gradient rows outlive their block's backward). The inner product needs no
gathering:

    ⟨∇_W L, E⟩ = Σ_processes ⟨(∇_W L)_shard, E_shard⟩

FSDP divides the reduce-scattered gradient by its gradient divide factor (the data-parallel size unless the user set
another); each local inner product is multiplied by that factor again, so the sums over processes are the same
``Σ_ranks ⟨∇ Σ loss_rank, E⟩`` as under DDP, and :class:`~lightning_delta.callbacks.RiemannCallback` reduces
them the same way (float64 sums over processes).

Why in place and not a parametrization as :class:`~lightning_delta.parametrize.EditedModel`: FSDP2 all-gathers the
parameter registered on the module and puts the gathered tensor back on that module; a parametrization would see a
shard where it expects the whole tensor. Writing the shard in place is what an optimizer step does under FSDP2, so
FSDP's own gathering and prefetching serve every point. W_post is kept as a copy of the local rows (1/N of the
edited weights per process) and written back exactly when the sweep ends, after an error too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TypeGuard

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_delta.padding import true_embedding_gradients
from lightning_delta.parametrize import check_E_dtype, inner_product, stored_dtype

__all__ = [
    "ShardedEditedModel",
    "check_strategy",
    "gather_rows",
    "is_sharded",
    "local_rows",
    "row_range",
    "shard_model",
    "sharded_parameters",
]


def check_strategy(strategy: object) -> None:
    """Refuse Lightning's ``FSDPStrategy`` (FSDP1): it flattens each block's parameters into one ``FlatParameter``,
    which neither the parametrization ``W_post + t·E`` nor per-tensor rows of ``E`` can follow. FSDP2
    (``ModelParallelStrategy``) keeps each parameter a tensor of its own."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "lightning_delta runs sharded models under ModelParallelStrategy (FSDP2's fully_shard), not FSDPStrategy "
            "(FSDP1 flattens each block's parameters into one FlatParameter, which the edit W_post + t·E cannot "
            "follow tensor by tensor). Create the Trainer with strategy=ModelParallelStrategy(data_parallel_size=N, "
            "tensor_parallel_size=1), N the number of processes."
        )


def is_sharded(tensor: Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism)."""
    return isinstance(tensor, DTensor)


def sharded_parameters(model: nn.Module) -> dict[str, DTensor]:
    """The parameters of ``model`` that are ``DTensor`` shards, by name."""
    return {name: parameter for name, parameter in model.named_parameters() if is_sharded(parameter)}


def local_rows(full: Tensor, like: DTensor) -> Tensor:
    """This process's part of ``full`` (a whole tensor, equal on every process) as ``like`` is laid out; no
    communication."""
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def row_range(tensor: DTensor) -> tuple[int, int] | None:
    """The rows ``(start, stop)`` of the whole tensor that this process holds, for FSDP2's layout (one mesh
    dimension, ``Shard(0)``: ``torch.chunk`` of the rows, the last processes' chunks shorter or empty); ``None`` for
    any other layout, or if the local rows do not have the length that layout gives."""
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or tensor.ndim == 0:
        return None
    rows, processes = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-rows // processes)
    start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    return (start, stop) if tensor.to_local().shape[0] == stop - start else None


def gather_rows(rows: Tensor, like: DTensor) -> Tensor:
    """The whole tensor from each process's ``rows``, laid out as ``like`` (an all-gather); equal on every
    process."""
    return DTensor.from_local(
        rows, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    ).full_tensor()


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` each block of ``model`` and then the model itself over the data-parallel dimension of ``mesh``.

    The blocks are the modules of the classes a Hugging Face model lists in ``_no_split_modules`` (its decoder
    layers); a model without that list is sharded as one unit. Tensor parallelism is not supported: the mesh of
    Lightning's ``ModelParallelStrategy`` must have ``tensor_parallel`` size 1.

    Raises:
        ValueError: a ``tensor_parallel`` dimension larger than 1.
    """
    if mesh.mesh_dim_names is not None and "data_parallel" in mesh.mesh_dim_names:
        tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in mesh.mesh_dim_names else 1
        if tensor_parallel > 1:
            raise ValueError(
                f"The sweep shards the model with FSDP2 over data-parallel processes only, but the device mesh has "
                f"tensor_parallel size {tensor_parallel}. Create the strategy as ModelParallelStrategy("
                f"data_parallel_size={mesh.size()}, tensor_parallel_size=1)."
            )
        mesh = mesh["data_parallel"]
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_divide_factors(model: nn.Module) -> dict[int, float]:
    """``id(sharded parameter) -> the factor FSDP2 divides its reduced gradient by``.

    FSDP2 sums the gradients over the data-parallel processes and divides by the group's
    ``gradient_divide_factor``, by default the data-parallel size (shard size × replicate size under HSDP). The
    factor lives in FSDP's parameter groups, which have no public getter; the tests that compare a sharded sweep
    with one process catch any change of this rule.
    """
    factors: dict[int, float] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        factor = group.gradient_divide_factor
        if factor is None:
            info = group.mesh_info
            factor = getattr(info, "shard_mesh_size", 1) * getattr(info, "replicate_mesh_size", 1)
        for fsdp_param in group.fsdp_params:
            factors[id(fsdp_param.sharded_param)] = float(factor)
    return factors


class ShardedEditedModel:
    """Drives ``W_post + t·E`` on the ``DTensor`` parameters of an FSDP2-sharded model, one shard per process.

    An :class:`~lightning_delta.handle.EditHandle`, as :class:`~lightning_delta.parametrize.EditedModel` is, so the
    Riemann callback drives both.
    As there, an edited ``nn.Embedding`` with ``padding_idx`` runs its forward without it while the edit is held
    (:mod:`lightning_delta.padding`).

    Args:
        model: the sharded post-trained model; its shards are W_post.
        E: tensor name (as in ``model.named_parameters()``) to this process's rows of ``E = F(ΔW) − ΔW``
            (:func:`local_rows`).
        E_dtype: ``"float32"`` (float64 for float64 weights) or ``"model"``; the caller has cast ``E`` already.

    Raises:
        ValueError: a name that is not a sharded parameter, or an ``E`` whose shape is not the local shard's.
    """

    def __init__(self, model: nn.Module, E: Mapping[str, Tensor], E_dtype: str = "float32") -> None:  # noqa: N803
        self.E_dtype = check_E_dtype(E_dtype)
        self.t = 0.0  # where set_t put every edited tensor
        self.model = model
        self.names: list[str] = sorted(E)
        parameters = sharded_parameters(model)
        for name in self.names:
            if name not in parameters:
                raise ValueError(
                    f"Edited tensor {name!r} is not a sharded (DTensor) parameter of {type(model).__name__}: under a "
                    "sharded strategy every edited tensor must be a parameter that fully_shard has sharded."
                )
            local = parameters[name].to_local()
            got = tuple(E[name].shape) if isinstance(E[name], Tensor) else type(E[name]).__name__
            if got != tuple(local.shape):
                raise ValueError(
                    f"E for {name!r} has shape {got}; the tensor has shape "
                    f"{tuple(parameters[name].shape)} (this process holds rows {tuple(local.shape)})."
                )
        self._parameters = {name: parameters[name] for name in self.names}
        self._E = {
            name: E[name].detach().to(parameters[name].device, stored_dtype(parameters[name].dtype, E_dtype))
            for name in self.names
        }
        self._post = {name: parameters[name].to_local().detach().clone() for name in self.names}
        factors = gradient_divide_factors(model)
        self._factors = {name: factors.get(id(parameters[name]), 1.0) for name in self.names}
        self._inner = {name: torch.zeros((), dtype=torch.float64, device=self._E[name].device) for name in self.names}
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for shard in self._parameters.values():
            shard.requires_grad_(True)
        # FSDP2 calls these right after it has reduce-scattered a block's gradients: the rows of ∇W are turned into
        # the inner product and freed then, so no edited tensor's gradient outlives its block's backward.
        self._hooks = [
            parameter.register_post_accumulate_grad_hook(self._take_inner_product(name))
            for name, parameter in self._parameters.items()
        ]
        edited = {id(parameter) for parameter in self._parameters.values()}
        owners = [
            module
            for module in model.modules()
            if any(id(parameter) in edited for parameter in module.parameters(recurse=False))
        ]
        self._padding = contextlib.ExitStack()
        self._padding.enter_context(true_embedding_gradients(owners))  # the padding row's share of ⟨∇L, E⟩

    def _take_inner_product(self, name: str):
        def hook(parameter: DTensor) -> None:
            grad = parameter.grad
            assert isinstance(grad, DTensor), "FSDP2 calls the hook with the reduce-scattered rows of ∇W"
            self._inner[name] += inner_product(grad.to_local(), self._E[name]) * self._factors[name]
            parameter.grad = None

        return hook

    def __len__(self) -> int:
        return len(self.names)

    def original(self, name: str) -> Tensor:
        """This process's rows of W_post of tensor ``name``."""
        return self._post[name]

    def E(self, name: str) -> Tensor:  # noqa: N802 (the paper's name)
        """This process's rows of ``E`` of tensor ``name``."""
        return self._E[name]

    def weights_bytes(self) -> int:
        """The bytes of this process's rows of the edited tensors."""
        return sum(post.numel() * post.element_size() for post in self._post.values())

    def set_t(self, t: float) -> None:
        """Write ``W_post + t·E`` into every edited shard (as the parametrization adds it: in E's dtype, then cast)."""
        self.t = float(t)
        with torch.no_grad():
            for name in self.names:
                post = self._post[name]
                self._parameters[name].to_local().copy_(torch.add(post, self._E[name], alpha=t).to(post.dtype))

    def pop_inner_products(self) -> Tensor:
        """This process's ``⟨(∇L)_shard, E_shard⟩`` per tensor (float64, order of :attr:`names`), times FSDP's
        divide factor, taken during backward; clears them."""
        if not self.names:
            return torch.zeros(0, dtype=torch.float64)
        values = torch.stack([self._inner[name].clone() for name in self.names])
        for value in self._inner.values():
            value.zero_()
        return values

    @contextlib.contextmanager
    def recompute_weights(self) -> Iterator[None]:
        """Nothing to do: FSDP gathers ``W(t)`` again from the shards in backward."""
        yield

    def materialize(self, t: float = 1.0) -> nn.Module:
        """Leave ``W_post + t·E`` in the shards and forget the edit."""
        self.set_t(t)
        self._detach()
        return self.model

    def remove(self) -> nn.Module:
        """Write W_post back into the shards and forget the edit."""
        with torch.no_grad():
            for name in self.names:
                self._parameters[name].to_local().copy_(self._post[name])
        self._detach()
        return self.model

    def _detach(self) -> None:
        self._padding.close()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for parameter in self.model.parameters():
            parameter.requires_grad_(self._requires_grad.get(id(parameter), parameter.requires_grad))
            parameter.grad = None
        self._parameters, self._E, self._post = {}, {}, {}
        self.names = []
