"""The padding row of an ``nn.Embedding`` gets its true gradient wherever the library differentiates the loss.

``nn.Embedding(…, padding_idx=p)`` reads row ``p`` in its forward like any other row, but its backward gives that
row no gradient (PyTorch's rule for training, where the padding vector is kept fixed). Every gradient this library
takes is the gradient of the loss as the forward computes it: ``⟨∇_W L(W_post + tE), E⟩`` at the Riemann points and
∇L(W_post) for ``GradientBiased`` and the planner. Where token ``p`` is also an ordinary input (``pad_token_id`` set
to eos, which a chat template writes after every turn; or any id of random test data), the embedding's inner
product would miss row ``p``'s share, and the Riemann term would disagree with the exact ΔL without any sign.

Inside :func:`true_embedding_gradients` each such embedding runs its forward with ``padding_idx = None``: the output
is the same tensor (``F.embedding`` uses ``padding_idx`` in backward only), and the gradient of row ``p`` is
``Σ_{positions i with input_i = p} ∂L/∂output_i`` as for every other row. ``padding_idx`` is cleared by a forward
pre-hook and put back by a forward hook that runs even when the forward raises, so code outside the embedding's
own forward (a model that reads ``embed_tokens.padding_idx``, ``repr``, ``resize_token_embeddings``) still sees
the module's value; leaving the context removes the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["true_embedding_gradients"]


@contextlib.contextmanager
def true_embedding_gradients(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While inside, every ``nn.Embedding`` (or subclass) among ``modules`` with ``padding_idx`` set computes its
    forward without it, so that backward gives the padding row its gradient; other modules are left alone.

    Example:
        >>> import torch
        >>> embedding = nn.Embedding(3, 2, padding_idx=0)
        >>> with true_embedding_gradients([embedding]):
        ...     embedding(torch.tensor([0, 0, 1])).sum().backward()
        >>> embedding.weight.grad[0].tolist(), embedding.padding_idx
        ([2.0, 2.0], 0)
    """
    handles = []
    try:
        for module in modules:
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                handles.append(module.register_forward_pre_hook(_clear_padding_idx))
                handles.append(module.register_forward_hook(_restore_padding_idx(module.padding_idx), always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _clear_padding_idx(module: nn.Embedding, args) -> None:
    module.padding_idx = None


def _restore_padding_idx(padding_idx: int):
    def hook(module: nn.Embedding, args, output) -> None:
        module.padding_idx = padding_idx

    return hook
