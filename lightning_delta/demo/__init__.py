"""``lightning-delta demo``: the paper's findings on real pre/post pairs in the paper's regime, offline, on a CPU.

1. The pairs: the reference pairs that ship with the package (:func:`~lightning_delta.demo.pair.shipped_pair`,
   seeds 0, 1 and 2), a Llama of 549,504 parameters pre-trained on scikit-learn's bundled 8×8 digits (next-patch
   prediction, some answers), then briefly post-trained on the answers: ΔW is about 4 % of ‖W_pre‖ (printed per
   module). Every machine analyses the same weights; ``train=True`` trains the pairs here instead
   (:func:`~lightning_delta.demo.pair.build_pair`, cached), reported as "your pair".
2. For each pair, a sweep through the same code as ``lightning-delta sweep`` (:func:`lightning_delta.sweep.run.sweep`:
   ``trainer.validate`` + ``RiemannCallback``, C = 5) over the grid of ``configs/demo.yaml``, every randomised
   edit under five mask seeds; then the delta-scale experiment, the same edits with W_pre moved to ``W_post − s·ΔW``.
3. Eq. 6's expectation from one gradient at W_post (:func:`~lightning_delta.demo.analysis.first_order_terms`).
4. The first pair's findings table (:func:`~lightning_delta.demo.analysis.findings`: each claim of the paper, its
   numbers over the seeds, holds or departs), Table 1 in the paper's layout, every setting's mean ± std, the JSONL
   results file and the figures in ``output_dir``; then the verdicts over all the pairs
   (:func:`~lightning_delta.demo.analysis.over_pairs_table`), each other pair's files in ``output_dir/pairs/``.
"""

from __future__ import annotations

from lightning_delta.demo.analysis import findings
from lightning_delta.demo.command import demo
from lightning_delta.demo.config import DEMO_CONFIG, FAST_GRID, demo_config, demo_grid, scale_blocks, sweep_config
from lightning_delta.demo.first_order import gradient_and_deltas, gradient_terms, sweep_agreement
from lightning_delta.demo.pair import PairSettings, build_pair, default_cache_dir, scaled_pretrained, shipped_pair

__all__ = [
    "DEMO_CONFIG",
    "FAST_GRID",
    "PairSettings",
    "build_pair",
    "default_cache_dir",
    "demo",
    "demo_config",
    "demo_grid",
    "findings",
    "gradient_and_deltas",
    "gradient_terms",
    "scale_blocks",
    "scaled_pretrained",
    "shipped_pair",
    "sweep_agreement",
    "sweep_config",
]
