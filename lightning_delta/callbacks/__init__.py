"""Callbacks: the Riemann sweep under ``trainer.validate``."""

from lightning_delta.callbacks.result import RiemannResult, RiemannSums, module_groups
from lightning_delta.callbacks.riemann import RiemannCallback

__all__ = ["RiemannCallback", "RiemannResult", "RiemannSums", "module_groups"]
