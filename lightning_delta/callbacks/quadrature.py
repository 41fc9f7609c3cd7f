"""Quadrature rules for ΔL = ∫₀¹ ⟨∇L(W_post + tE), E⟩ dt: where the Riemann sweep puts its points and their weights.

With ``g(t) = ⟨∇L(W_post + tE), E⟩`` (one backward pass over the data per node):

    left       (1/C) Σ_{c=0}^{C−1} g(c/C)                          the paper's eq. 1, error O(1/C), C passes
    trapezoid  (1/C) [½ g(0) + Σ_{c=1}^{C−1} g(c/C) + ½ g(1)]      error O(1/C²), C + 1 passes
    gauss      Σ_i w_i g(t_i), the n Gauss–Legendre nodes on (0, 1), exact for polynomials of degree 2n − 1, n passes
    adaptive   the nested Gauss–Kronrod–Patterson rules with 1, 3, 7, 15, 31 nodes (each contains the nodes of the
               one before): 3 nodes first, then 4, 8, 16 more until the per-tensor error estimate
               |Q_level − Q_level−1| is below ``tolerance`` × the largest |per-tensor term|

Every schedule also runs forwards at t = 0 and t = 1 for the exact ``ΔL = L(W_post + E) − L(W_post)``; a rule runs
a backward at t = 1 only when its nodes include 1 (the trapezoid, or the left rule with ``trapezoid=True``).

The adaptive mode's estimate is the difference to the previous, lower-order rule of the chain: for a smooth
integrand it is about that rule's own error, far more than the error of the value it reports (the new rule's
degree of exactness is roughly twice as high). Patterson's construction (Math. Comp. 22, 1968) adds to N nodes the
N + 1 roots of the polynomial orthogonal, under the weight ``Π (x − x_i)``, to every polynomial of lower degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from numpy.polynomial import legendre

__all__ = [
    "RULES",
    "Schedule",
    "adaptive_levels",
    "default_num_points",
    "gauss_legendre",
    "patterson_chain",
    "schedule",
]

RULES = ("left", "trapezoid", "gauss", "adaptive")
ADAPTIVE_NODES = (3, 7, 15, 31)  # the chain's levels after the midpoint G1


@dataclass(frozen=True)
class Schedule:
    """The points of one sweep: every ``t`` that runs a forward pass, in order (0 first, 1 last), whether a
    backward runs there, and the rule's weight of each (0 where there is no backward)."""

    rule: str
    points: tuple[float, ...]
    gradient: tuple[bool, ...]
    weights: tuple[float, ...]

    @property
    def passes(self) -> int:
        """Backward passes (forward and backward) per batch."""
        return sum(self.gradient)


def default_num_points(rule: str) -> int:
    """The number of points a rule takes when none is given: the paper's C = 5 for the left rule and the trapezoid,
    3 Gauss nodes, and for the adaptive rule the most nodes it may use (31, the whole chain)."""
    return {"left": 5, "trapezoid": 5, "gauss": 3, "adaptive": ADAPTIVE_NODES[-1]}[rule]


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n Gauss–Legendre nodes and weights on [0, 1] (``numpy.polynomial.legendre.leggauss`` mapped there)."""
    x, w = legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


def _interpolatory_weights(x: np.ndarray) -> np.ndarray:
    """Weights on [−1, 1] that integrate every polynomial of degree < len(x) exactly at the nodes ``x``."""
    basis = legendre.legvander(x, len(x) - 1).T  # (degree, node): P_j(x_i)
    moments = np.zeros(len(x))
    moments[0] = 2.0  # ∫ P_0 = 2, ∫ P_j = 0 for j > 0
    return np.linalg.solve(basis, moments)


def _extend(x: np.ndarray) -> np.ndarray:
    """The N + 1 nodes (on [−1, 1]) that Patterson's construction adds to the N nodes ``x``: the roots of the
    polynomial q of degree N + 1 with ∫ q(y) Π(y − x_i) P_j(y) dy = 0 for j ≤ N."""
    m = len(x) + 1
    y, v = legendre.leggauss(3 * m + 8)  # exact for the degree 3N + 2 integrands below
    omega = np.prod(y[:, None] - x[None, :], axis=1)
    basis = legendre.legvander(y, m)  # (quadrature node, j): P_j(y)
    gram = (basis[:, :m] * (v * omega)[:, None]).T @ basis  # (i < m, j ≤ m): ∫ P_i ω P_j
    coefficients = np.append(np.linalg.solve(gram[:, :m], -gram[:, m]), 1.0)
    roots = legendre.legroots(coefficients)
    if np.iscomplexobj(roots) or np.abs(roots).max() >= 1.0:
        raise ArithmeticError(f"Patterson's extension of {len(x)} nodes has no {m} real nodes inside (−1, 1).")
    return np.sort(roots.real)


@cache
def patterson_chain() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """The nested rules with 1, 3, 7, 15, 31 nodes on [0, 1]: per level, the nodes it adds, then all its nodes
    (sorted) and their weights. The 3-node rule is Gauss–Legendre's, the 7-node one the Kronrod extension of it."""
    x = np.zeros(1)
    levels = [(np.array([0.5]), np.array([0.5]), np.array([1.0]))]
    for _ in ADAPTIVE_NODES:
        added = _extend(x)
        x = np.sort(np.concatenate([x, added]))
        levels.append(((added + 1.0) / 2.0, (x + 1.0) / 2.0, _interpolatory_weights(x) / 2.0))
    return tuple(levels)


def adaptive_levels(num_points: int) -> int:
    """How many levels after the midpoint the adaptive rule may run with at most ``num_points`` nodes."""
    return ADAPTIVE_NODES.index(num_points) + 1


def schedule(rule: str, num_points: int, trapezoid: bool = False, level: int = 1) -> Schedule:
    """The points of ``rule`` with ``num_points`` (C, or n nodes); the adaptive rule's at ``level`` of its chain
    (1: the 3 Gauss nodes, 2: 7, ...). ``trapezoid`` adds the left rule's backward at t = 1."""
    if rule in ("left", "trapezoid"):
        C = num_points
        points = tuple(c / C for c in range(C + 1))
        gradient = tuple(c < C or trapezoid or rule == "trapezoid" for c in range(C + 1))
        if rule == "left":
            weights = tuple(1.0 / C if c < C else 0.0 for c in range(C + 1))
        else:
            weights = tuple((0.5 if c in (0, C) else 1.0) / C for c in range(C + 1))
        return Schedule(rule, points, gradient, weights)
    if rule == "gauss":
        nodes, node_weights = gauss_legendre(num_points)
    elif rule == "adaptive":
        _, nodes, node_weights = patterson_chain()[level]
    else:
        raise ValueError(f"Unknown quadrature rule {rule!r}; the rules are {', '.join(map(repr, RULES))}.")
    points = (0.0, *map(float, nodes), 1.0)
    gradient = (False, *([True] * len(nodes)), False)
    return Schedule(rule, points, gradient, (0.0, *map(float, node_weights), 0.0))


def check_rule(rule: str, num_points: int | None, trapezoid: bool | None, tolerance: float) -> tuple[int, bool]:
    """``num_points`` and ``trapezoid`` resolved for ``rule`` (see :class:`~lightning_delta.RiemannCallback`).

    Raises:
        ValueError: an unknown rule, a point count that is not a whole number ≥ 1 (for ``adaptive``: not one of 3,
            7, 15, 31), ``trapezoid`` that contradicts the rule, a tolerance that is not > 0.
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {', '.join(map(repr, RULES))}, got {rule!r}.")
    if num_points is None:
        num_points = default_num_points(rule)
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 1:
        raise ValueError(f"`num_points` must be an integer >= 1 (the paper uses 5), got {num_points!r}.")
    if rule == "adaptive" and num_points not in ADAPTIVE_NODES:
        raise ValueError(
            f"With rule='adaptive', `num_points` is the most nodes it may use, one of the nested rules' "
            f"{', '.join(map(str, ADAPTIVE_NODES))}; got {num_points}."
        )
    if rule == "left":
        trapezoid = True if trapezoid is None else trapezoid
    elif rule == "trapezoid":
        if trapezoid is False:
            raise ValueError(
                "rule='trapezoid' needs its backward at t = 1: leave `trapezoid` unset (or true), or use "
                "rule='left', trapezoid=False."
            )
        trapezoid = True
    elif trapezoid:
        raise ValueError(
            f"`trapezoid=True` runs the left rule's points and a backward at t = 1; rule={rule!r} has its "
            "own nodes inside (0, 1). Leave `trapezoid` unset, or use rule='trapezoid'."
        )
    else:
        trapezoid = False
    if not (
        isinstance(tolerance, (int, float))
        and not isinstance(tolerance, bool)
        and math.isfinite(tolerance)
        and tolerance > 0
    ):
        raise ValueError(
            f"`tolerance` must be a number > 0 (relative to the largest per-tensor term), got {tolerance!r}."
        )
    return num_points, trapezoid
