"""The budgeted choice of one setting per tensor: an exact multiple-choice knapsack.

Minimise ``Σ_k s_k(v_k)`` (the predicted loss change, a sum of per-tensor scores) subject to
``Σ_k cost_k(v_k) ≤ B``. Why a knapsack and not a greedy rule: the scores are signed and not convex in the
setting (DARE's first-order term changes sign from mask to mask; a lower BitDelta setting can score better), so
the greedy rule of the largest score drop per unit of cost, which is optimal only for convex per-tensor curves, can
miss the optimum. The dynamic programme over the tensors keeps, for every reachable total cost, the best score
(a Pareto front, dominated states dropped, states that cannot finish within ``B`` pruned): it is exactly optimal.

Complexity: every cost is an integer multiple of ``g``, the greatest common divisor of all ``cost_k(v)``, so there
are at most ``P = B / g + 1`` states and the programme takes ``O(K · V · P)`` time and ``O(K · P)`` memory for
``K`` tensors and ``V`` settings. Where ``B / g`` exceeds ``max_states`` (a large model whose norm vectors make
``g`` small), every cost is rounded *up* to a multiple of ``U = ⌈(B / g) / max_states⌉ · g``: the plan still
meets the true budget, and it is optimal among the plans whose rounded costs fit (at most ``K · U`` of the budget
is given up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["allocate"]


def _integer_units(
    costs: Sequence[Sequence[Fraction]], budget: Fraction, max_states: int
) -> tuple[list[list[int]], int]:
    """The costs in integer units of ``g`` (their greatest common divisor; of ``U`` past ``max_states``, each cost
    rounded up) and the budget in the same units, rounded down."""
    denominator = math.lcm(*(cost.denominator for row in costs for cost in row), budget.denominator)
    scaled = [[int(cost * denominator) for cost in row] for row in costs]
    unit = math.gcd(*(value for row in scaled for value in row)) or 1
    capacity = int(budget * denominator) // unit
    coarse = max(1, -(-capacity // max_states))
    return [[-(-(value // unit) // coarse) for value in row] for row in scaled], capacity // coarse


def allocate(
    scores: Sequence[Sequence[float]], costs: Sequence[Sequence[Fraction]], budget: Fraction, max_states: int = 200_000
) -> list[int]:
    """The setting index ``j_k`` for each tensor minimising ``Σ_k scores[k][j_k]`` with ``Σ_k costs[k][j_k] ≤ budget``.

    Ties go to the lower total cost. ``max_states`` bounds the cost states (see the module docstring).

    Raises:
        ValueError: the rows differ in length, a cost is negative, or even the cheapest choice exceeds the budget.
    """
    if len(scores) != len(costs) or any(len(s) != len(c) or not s for s, c in zip(scores, costs)):
        raise ValueError("allocate: scores and costs must have one non-empty row of the same length per tensor.")
    if any(cost < 0 for row in costs for cost in row):
        raise ValueError("allocate: costs must be >= 0.")
    cheapest = sum((min(row) for row in costs), Fraction(0))
    if cheapest > budget:
        raise ValueError(
            f"plan: the budget {float(budget):g} is below the cheapest plan, {float(cheapest):g} (every tensor at its "
            "cheapest candidate). Raise the budget or add a cheaper candidate."
        )
    if not scores:
        return []
    units, capacity = _integer_units(costs, budget, max_states)
    remaining_min = [0] * (len(units) + 1)
    for k in range(len(units) - 1, -1, -1):
        remaining_min[k] = remaining_min[k + 1] + min(units[k])
    # state: total cost -> (score, choices as a linked list (index, parent))
    front: dict[int, tuple[float, tuple | None]] = {0: (0.0, None)}
    for k, (row_scores, row_units) in enumerate(zip(scores, units)):
        reachable: dict[int, tuple[float, tuple | None]] = {}
        limit = capacity - remaining_min[k + 1]
        for cost, (score, choices) in front.items():
            for j, (value, step) in enumerate(zip(row_scores, row_units)):
                total = cost + step
                if total > limit:
                    continue
                candidate = score + float(value)
                best = reachable.get(total)
                if best is None or candidate < best[0]:
                    reachable[total] = (candidate, (j, choices))
        front, best_score = {}, math.inf
        for cost in sorted(reachable):  # Pareto: keep a state only if it beats every cheaper one
            score, choices = reachable[cost]
            if score < best_score:
                front[cost], best_score = (score, choices), score
    if not front:
        raise ValueError(
            f"plan: no plan fits the budget {float(budget):g} once costs are rounded to {max_states} "
            "states; raise max_states."
        )
    _, (_, choices) = min(front.items(), key=lambda item: (item[1][0], item[0]))
    picked: list[int] = []
    while choices is not None:
        picked.append(choices[0])
        choices = choices[1]
    return picked[::-1]
