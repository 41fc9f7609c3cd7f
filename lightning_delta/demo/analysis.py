"""The demo's numbers over seeds, and the paper's findings read off them: one row each, holds or departs.

Everything here is arithmetic on sweep rows (:class:`~lightning_delta.sweep.SweepRow`) and on a few tensors; nothing
runs a model except :func:`loss_gradient`. The demo (:mod:`lightning_delta.demo`) calls these after its sweep:

* :func:`~lightning_delta.rows.aggregate`: the rows that differ only in the edit's seed, as one setting with mean ±
  sample std (:mod:`lightning_delta.rows`, which the figures read too);
* :func:`first_order_terms`: Eq. 6's quantity ``⟨∇L(W_post), F(ΔW) − ΔW⟩`` for many masks, from one gradient;
* :func:`findings`: one :class:`Finding` per claim of the paper, its numbers and whether it holds here;
* :func:`table1`: the paper's Table 1 in its layout (k; random, sign-biased, gradient-biased), from the rows;
* :func:`quadrature_grid` and :func:`quadrature_findings`: the paper's left rule against Gauss–Legendre at equal
  passes, per setting, against a high-order Gauss reference (a sweep whose grid varies ``riemann.rule``).

A setting is **competitive** when its mean ΔL is at most :data:`COMPETITIVE` (10 %) of ``R = L(W_pre) − L(W_post)``,
the loss change of reverting to W_pre altogether, measured on the same images (EXPO's α = −1): the edited model keeps
at least 90 % of what post-training gained on the loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_delta.edits import DeltaEdit, build
from lightning_delta.edits.bitdelta import magnitude_blocks, paper_bits
from lightning_delta.edits.lowrank import resolve_rank
from lightning_delta.losses import CausalLMLoss
from lightning_delta.padding import true_embedding_gradients
from lightning_delta.rows import Setting, aggregate, edit_family, edit_label, edit_parameters, stat
from lightning_delta.sweep import SweepRow

__all__ = [
    "COMPETITIVE",
    "Finding",
    "findings",
    "holds",
    "over_pairs_table",
    "first_order_terms",
    "edit_sizes",
    "findings_table",
    "loss_gradient",
    "lowrank_density",
    "loglog_slope",
    "quadrature_findings",
    "quadrature_grid",
    "regime_table",
    "revert_cost",
    "settings_table",
    "table1",
]

COMPETITIVE = 0.1  # competitive: mean ΔL <= COMPETITIVE · R, R the loss change of reverting to W_pre
TEST = "Digits/test"


# ------------------------------------------------------------------------------------------------ statistics
def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``log y`` against ``log x``: the exponent ``a`` of ``y ≈ b·x^a``.

    Example:
        >>> round(loglog_slope([0.25, 0.5, 1.0], [0.0625, 0.25, 1.0]), 6)
        2.0
    """
    if len(xs) != len(ys) or len(xs) < 2 or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"loglog_slope needs two or more positive pairs, got x={list(xs)}, y={list(ys)}.")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# -------------------------------------------------------------------------------------------------- settings
def _find(
    settings: Sequence[Setting], family: str, dataset: str = TEST, scale: float = 1.0, **params: Any
) -> Setting | None:
    for setting in settings:
        if (
            setting.family == family
            and setting.dataset == dataset
            and setting.scale == scale
            and all(setting.edit.get(key) == value for key, value in params.items())
        ):
            return setting
    return None


def _select(
    settings: Sequence[Setting], family: str, dataset: str = TEST, scale: float = 1.0, **params: Any
) -> list[Setting]:
    return [
        setting
        for setting in settings
        if setting.family == family
        and setting.dataset == dataset
        and setting.scale == scale
        and all(setting.edit.get(key) == value for key, value in params.items())
    ]


def revert_cost(settings: Sequence[Setting], dataset: str = TEST, scale: float = 1.0) -> float | None:
    """``R = L(W_pre) − L(W_post)`` on ``dataset``: the ΔL of EXPO's α = −1 (None if the sweep had no such row)."""
    setting = _find(settings, "extrapolate", dataset, scale, alpha=-1.0)
    return None if setting is None else setting.exact.mean


# ----------------------------------------------------------------------------------------------- Eq. 6 terms
def loss_gradient(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """∇L(W) of the mean answer loss (:class:`~lightning_delta.losses.CausalLMLoss`, the loss the sweep measures)
    over ``batch``, for every parameter (an embedding's padding row included: :mod:`lightning_delta.padding`); the
    model's flags and ``.grad`` are left as they were."""
    parameters = dict(model.named_parameters())
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}
    try:
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        with true_embedding_gradients(model.modules()):
            output = CausalLMLoss()(model, batch)
        loss = output.total / output.count
        gradients = torch.autograd.grad(loss, list(parameters.values()))
    finally:
        for name, parameter in parameters.items():
            parameter.requires_grad_(flags[name])
    return {name: gradient.detach() for name, gradient in zip(parameters, gradients)}


def first_order_terms(
    gradients: Mapping[str, Tensor], deltas: Mapping[str, Tensor], edits: Iterable[DeltaEdit]
) -> list[float]:
    """``⟨∇L(W_post), F(ΔW) − ΔW⟩`` for each edit, summed over every tensor in float64: the c = 0 summand of Eq. 1,
    the quantity whose expectation over DARE's mask Eq. 6 sets to 0 (and drop only's to ``−p⟨∇L, ΔW⟩``)."""
    values = []
    for edit in edits:
        total = torch.zeros((), dtype=torch.float64)
        for name, delta in deltas.items():
            difference = edit.edit_tensor(name, delta).double() - delta.double()
            total += (gradients[name].double() * difference).sum()
        values.append(float(total))
    return values


def gradient_inner_product(gradients: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> float:
    """``⟨∇L(W_post), ΔW⟩`` in float64."""
    return float(sum((gradients[name].double() * delta.double()).sum() for name, delta in deltas.items()))


# -------------------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One claim of the paper and what the demo measured, a row of :func:`findings_table`: ``verdict`` is ``holds``
    or ``departs`` (where), or, for a row of the demo's own that explains a departure, ``explains #n``. ``topic``
    and ``p`` say what the row is about, so that the rows that explain it can cite it."""

    claim: str  # the paper's finding, with its section or figure
    measured: str  # the numbers, mean ± std over the seeds
    seeds: str  # how many seeds the numbers are over ("5", "det." for an edit without randomness)
    verdict: str  # "holds", "departs", "departs at k = 0.5, 1.5", "explains #2"
    topic: str = ""  # the experiment: "dare" (§4.1), "k_extension" (§4.2), "table1_random", "table1_sign", ...
    p: float | None = None  # the drop rate the claim is about, where it names one

    @property
    def departs(self) -> bool:
        """Whether the verdict is ``departs`` (anywhere)."""
        return self.verdict.startswith("departs")


# The findings that a departure of random masks (DARE, its k extension) or of a structured edit makes: the demo's own
# rows explain them and cite their numbers.
RANDOM_TOPICS = ("dare", "k_extension", "table1_random")
STRUCTURED_TOPICS = ("table1_sign",)


def _seeds(settings: Iterable[Setting]) -> str:
    counts = sorted({len(setting.rows) if setting.randomised else 0 for setting in settings})
    return "/".join("det." if count == 0 else str(count) for count in counts)


def _verdict(holds: bool) -> str:
    return "holds" if holds else "departs"


def _share(value: float, revert: float) -> str:
    return f"{100 * value / revert:.0f}% of R"


def _split(setting: Setting) -> str:
    """Where ΔL comes from: its first-order part at W_post and the rest (curvature along the path)."""
    return f"first order {setting.first_order.mean:+.4f}, curvature {setting.curvature.mean:+.4f}"


def _dare_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    lines = []
    for dare in sorted(_select(settings, "dare", k=0.0), key=lambda setting: setting.edit["p"]):
        p = dare.edit["p"]
        if p < 0.9:
            continue
        drop = _find(settings, "drop_only", p=p)
        holds = dare.exact.mean <= COMPETITIVE * revert
        measured = f"DARE ΔL {dare.exact} ({_share(dare.exact.mean, revert)}"
        measured += ")" if holds else f"; {_split(dare)})"
        used = [dare]
        if drop is not None:
            used.append(drop)
            drops = drop.by_seed()
            paired = [
                (row.result.exact, drops[seed].result.exact) for seed, row in dare.by_seed().items() if seed in drops
            ]
            worse = sum(other > own for own, other in paired)
            measured += (
                f"; drop only ΔL {drop.exact} ({_share(drop.exact.mean, revert)}), worse than DARE on "
                f"{worse}/{len(paired)} seeds"
            )
            holds = holds and drop.exact.mean > COMPETITIVE * revert and worse == len(paired)
        lines.append(
            Finding(
                f"§4.1, Figs. 1, 3: DARE stays competitive at p = {p:g} while drop only (no rescale) does not",
                measured,
                _seeds(used),
                _verdict(holds),
                topic="dare",
                p=p,
            )
        )
    return lines


def _eq6_findings(settings: Sequence[Setting], gradient_terms: Mapping[str, Any] | None) -> list[Finding]:
    lines = []
    if gradient_terms:
        reference = gradient_terms["gradient_delta"]  # ⟨∇L(W_post), ΔW⟩
        for p in sorted(gradient_terms.get("dare", {})):
            dare = stat(gradient_terms["dare"][p])
            drop = stat(gradient_terms["drop_only"][p])
            dare_bound = 3 * dare.std / math.sqrt(dare.n)
            drop_bound = 3 * drop.std / math.sqrt(drop.n)
            expected = -p * reference
            check = gradient_terms.get("check", {}).get(p)
            agree = "" if check is None else f"; the sweep's c = 0 values for the same masks agree to {check:.1e}"
            lines.append(
                Finding(
                    f"Eq. 6: over the masks, ⟨∇L(W_post), E⟩ averages to 0 for DARE and to −p⟨∇L(W_post), ΔW⟩ for "
                    f"drop only (p = {p:g})",
                    f"DARE {dare} (|mean| ≤ 3·std/√n = {dare_bound:.4f}); drop only {drop} against {expected:+.4f} "
                    f"(|difference| {abs(drop.mean - expected):.4f} ≤ {drop_bound:.4f}){agree}",
                    f"{dare.n} (one gradient)",
                    _verdict(abs(dare.mean) <= dare_bound and abs(drop.mean - expected) <= drop_bound),
                    topic="eq6_masks",
                    p=p,
                )
            )
    for setting in sorted(_select(settings, "dare", k=0.0), key=lambda setting: setting.edit["p"]):
        if setting.edit["p"] < 0.9 or len(set(setting.seeds)) < 2:  # an average over masks needs several
            continue
        points = setting.inner_products()
        first = points[0]
        zero_first = abs(first.mean) <= 3 * first.std / math.sqrt(first.n)
        positive_later = all(point.mean > 3 * point.std / math.sqrt(point.n) for point in points[1:])
        shown = ", ".join(f"c={c}: {point}" for c, point in enumerate(points))
        lines.append(
            Finding(
                f"Eqs. 4–6 at every Riemann point: ⟨∇L(W_post + (c/C)E), E⟩ averages to 0 for DARE (p = "
                f"{setting.edit['p']:g}, C = {len(points)})",
                f"{shown}; their mean, the term: {setting.term}",
                _seeds([setting]),
                ("holds at c = 0" if zero_first else "departs at c = 0")
                + ("; departs at c ≥ 1 (∇L there depends on E)" if positive_later else "; holds at c ≥ 1"),
                topic="eq6_points",
                p=setting.edit["p"],
            )
        )
    return lines


def _coefficient(setting: Setting, sizes: Mapping[str, float]) -> float | None:
    """Curvature per unit of squared edit size: ``(ΔL − ⟨∇L(W_post), E⟩) / (‖E‖/‖ΔW‖)²``, None without sizes."""
    values = [sizes[row.key] for row in setting.rows if row.key in sizes]
    if len(values) != len(setting.rows) or not values:
        return None
    size = math.fsum(value * value for value in values) / len(values)
    return setting.curvature.mean / size if size > 0 else None


RANDOM = ("dare", "della")  # edits whose E is a random mask times ΔW
STRUCTURED = ("sign_biased", "magnitude_prune", "lowrank")  # deterministic E shaped by ΔW's signs or magnitudes


def _why_rows(
    settings: Sequence[Setting], revert: float, sizes: Mapping[str, float] | None, numbers: Mapping[str, list[int]]
) -> list[Finding]:
    """The demo's experiment behind the departures: how much curvature an edit costs per unit of its squared size
    ``(‖E‖/‖ΔW‖)²``, for random masks (DARE, its k extension, DELLA) and for structured edits (sign-biased, TIES,
    low rank)."""
    if not sizes:
        return []
    lines = []

    def measured(families: tuple[str, ...]) -> list[tuple[Setting, float]]:
        """The settings of ``families`` at full scale on the test data with a ΔL to explain, and their coefficient."""
        found = []
        for s in settings:
            if s.family in families and s.scale == 1.0 and s.dataset == TEST and s.exact.mean > 0.02 * revert:
                coefficient = _coefficient(s, sizes)
                if coefficient is not None:
                    found.append((s, coefficient))
        return found

    random, structured = measured(RANDOM), measured(STRUCTURED)
    if random:
        coefficients = [c for _, c in random]
        shown = "; ".join(
            f"{s.label()}: ‖E‖/‖ΔW‖ {_size(s, sizes):.2f}, curvature {s.curvature.mean:+.4f}, per size² {c:.4f}"
            for s, c in random
        )
        spread = max(coefficients) / min(coefficients) if min(coefficients) > 0 else math.inf
        threshold = COMPETITIVE * revert / stat(coefficients).mean
        cited = ", ".join(f"#{n}" for n in numbers.get("random", []))
        lines.append(
            Finding(
                "Why random masks depart at high p or negative k (the demo's experiment): their ΔL is curvature, a "
                "constant times (‖E‖/‖ΔW‖)² = (1 − k)²p/(1 − p)",
                f"{shown} (max/min {spread:.1f}); so 10% of R is reached at (‖E‖/‖ΔW‖)² ≈ {threshold:.0f} (DARE p = "
                f"{threshold / (1 + threshold):.3f})",
                _seeds(s for s, _ in random),
                f"explains {cited}" if cited else "(measured)",
                topic="why_random",
            )
        )
    if random and structured:
        base = stat(c for _, c in random).mean
        shown = "; ".join(
            f"{s.label()}: ‖E‖/‖ΔW‖ {_size(s, sizes):.2f}, curvature {s.curvature.mean:+.4f}, per size² "
            f"{c:.4f} ({c / base:.0f}× random)"
            for s, c in structured
        )
        cited = ", ".join(f"#{n}" for n in numbers.get("structured", []))
        lines.append(
            Finding(
                "Why structured edits depart (the demo's experiment): at the same size ‖E‖, an E shaped by ΔW's signs or "
                "magnitudes costs far more curvature than a random mask",
                f"{shown}; random masks: {base:.4f}",
                _seeds(s for s, _ in structured),
                f"explains {cited}" if cited else "(measured)",
                topic="why_structured",
            )
        )
    return lines


def _size(setting: Setting, sizes: Mapping[str, float]) -> float:
    values = [sizes[row.key] for row in setting.rows]
    return math.sqrt(math.fsum(value * value for value in values) / len(values))


def edit_sizes(
    deltas: Mapping[str, Tensor], rows: Iterable[SweepRow], gradients: Mapping[str, Tensor] | None = None
) -> dict[str, float]:
    """``‖F(ΔW) − ΔW‖ / ‖ΔW‖`` (Frobenius norms over every tensor, float64) of each row's edit, rebuilt from the row
    with :func:`lightning_delta.edits.build`, keyed by the row's key. ``gradients`` (∇L at W_post) serve the edits
    that need them; without, those rows are left out."""
    delta_norm = math.sqrt(math.fsum(float(delta.double().square().sum()) for delta in deltas.values()))
    sizes: dict[str, float] = {}
    done: dict[str, float] = {}
    for row in rows:
        key = repr(sorted(row.edit.items()))
        if key not in done:
            edit = build(**row.edit)
            if edit.needs_gradients and gradients is None:
                continue
            total = 0.0
            for name, delta in deltas.items():
                gradient = None if gradients is None else gradients.get(name)
                difference = edit.edit_tensor(name, delta, gradient).double() - delta.double()
                total += float(difference.square().sum())
            done[key] = math.sqrt(total) / delta_norm
        sizes[row.key] = done[key]
    return sizes


def _k_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    lines = []
    extension = [setting for setting in _select(settings, "dare") if setting.edit.get("k") not in (0.0, None)]
    table_ks = {setting.edit["k"] for setting in settings if setting.family in ("sign_biased", "gradient_biased")}
    for k in sorted({setting.edit["k"] for setting in extension}):
        chosen = sorted((setting for setting in extension if setting.edit["k"] == k), key=lambda s: s.edit["p"])
        if k > 0 and k in table_ks and k != 0.5:
            continue  # Table 1's k, in its rows
        parts, failing = [], []
        for setting in chosen:
            p = setting.edit["p"]
            text = f"p={p:g} (kp={k * p:+.2f}): ΔL {setting.exact} ({_share(setting.exact.mean, revert)})"
            if setting.exact.mean > COMPETITIVE * revert:
                failing.append(f"p = {p:g}")
                text += f", {_split(setting)}"
            parts.append(text)
        claim = (
            f"§4.2, Figs. 1, 2, 8–11: with k = {k:g} < 0 (the dropped entries' signs flipped) the model stays "
            "competitive"
            if k < 0
            else f"§4.2, Figs. 1, 2, 8–11: the k extension with k = {k:g} stays competitive"
        )
        verdict = (
            "holds"
            if not failing
            else (f"departs at {', '.join(failing)}" if len(failing) < len(chosen) else "departs")
        )
        lines.append(Finding(claim, "; ".join(parts), _seeds(chosen), verdict, topic="k_extension"))
    return lines


def table1_settings(settings: Sequence[Setting], p: float = 0.9) -> dict[float, dict[str, Setting | None]]:
    """``{k: {"random": …, "sign": …, "gradient": …}}`` over Table 1's k (those of the biased rows at ``p``)."""
    columns = {"random": "dare", "sign": "sign_biased", "gradient": "gradient_biased"}
    ks = sorted(
        {
            setting.edit["k"]
            for setting in settings
            if setting.family in ("sign_biased", "gradient_biased")
            and setting.edit.get("p") == p
            and setting.dataset == TEST
            and setting.scale == 1.0
        }
    )
    return {k: {column: _find(settings, family, p=p, k=k) for column, family in columns.items()} for k in ks}


def _table1_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    table = table1_settings(settings)
    lines = []
    claims = {
        "random": "§4.3, Table 1 (left): the random k extension keeps the model at p = 0.9 for every k in 0.5–1.5",
        "sign": "§4.3, Table 1 (middle): choosing by the sign of ΔW instead (no randomness) keeps it too",
        "gradient": "§4.3, Table 1 (right): choosing by the sign of ΔW·∇L ruins it (ΔL > R: worse than W_pre)",
    }
    for column, claim in claims.items():
        cells = [(k, setting) for k, row in table.items() if (setting := row[column]) is not None]
        if not cells:
            continue
        if column == "gradient":
            failing = [(k, s) for k, s in cells if s.exact.mean <= revert]
        else:
            failing = [(k, s) for k, s in cells if s.exact.mean > COMPETITIVE * revert]
        measured = "ΔL " + "; ".join(f"k={k:g}: {s.exact}" for k, s in cells) + f" (R = {revert:.4f})"
        if failing:
            measured += ". Where it departs: " + "; ".join(f"k={k:g}: {_split(s)}" for k, s in failing)
        verdict = (
            "holds"
            if not failing
            else (
                f"departs at k = {', '.join(f'{k:g}' for k, _ in failing)}" if len(failing) < len(cells) else "departs"
            )
        )
        lines.append(Finding(claim, measured, _seeds(s for _, s in cells), verdict, topic=f"table1_{column}", p=0.9))
    return lines


def _della_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    lines = []
    for della in _select(settings, "della"):
        p = della.edit["p"]
        dare = _find(settings, "dare", p=p, k=0.0)
        against = "" if dare is None else f"; DARE ΔL {dare.exact}"
        lines.append(
            Finding(
                f"§4: DELLA (magnitude-aware drop, ε = {della.edit['epsilon']:g}) stays competitive at p = {p:g}, as DARE",
                f"ΔL {della.exact} ({_share(della.exact.mean, revert)}){against}",
                _seeds([della]),
                _verdict(della.exact.mean <= COMPETITIVE * revert),
                topic="della",
                p=p,
            )
        )
    return lines


def _bitdelta_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    lines = []
    plain = sorted(
        (s for s in _select(settings, "bitdelta", magnitudes="mean") if s.edit.get("scale", 1.0) == 1.0),
        key=lambda s: magnitude_blocks(s.edit),
    )
    one = next((s for s in plain if magnitude_blocks(s.edit) == 1), None)
    if one is not None:
        lines.append(
            Finding(
                "§5.1, Fig. 3: BitDelta's term is > 0 and its loss rises",
                f"term {one.term}, ΔL {one.exact} ({_share(one.exact.mean, revert)})",
                "det.",
                _verdict(one.term.mean > 0 and one.exact.mean > 0),
                topic="bitdelta",
            )
        )
    if len(plain) >= 2:
        values = [s.exact.mean for s in plain]
        shown = ", ".join(
            f"M={magnitude_blocks(s.edit)} ({paper_bits(magnitude_blocks(s.edit)):g} bits): {s.exact.mean:+.4f}"
            for s in plain
        )
        lines.append(
            Finding(
                "§5.3, Fig. 4: more magnitude blocks M bring BitDelta closer to W_post (the paper's bits are log2 M)",
                f"ΔL {shown}",
                "det.",
                _verdict(all(b <= a for a, b in zip(values, values[1:]))),
                topic="bitdelta_blocks",
            )
        )
        top = plain[-1]
        blocks = magnitude_blocks(top.edit)
        lines.append(
            Finding(
                f"§5.3, Fig. 4: at the paper's {paper_bits(blocks):g} bits (M = {blocks}; {paper_bits(blocks) + 1:g} bits "
                "with the sign) BitDelta surpasses W_post",
                f"ΔL {top.exact.mean:+.4f} (< 0 would surpass); {_split(top)}",
                "det.",
                _verdict(top.exact.mean < 0),
                topic="bitdelta_surpasses",
            )
        )
    scaled = sorted(
        (s for s in _select(settings, "bitdelta", magnitudes="mean") if magnitude_blocks(s.edit) == 1),
        key=lambda s: s.edit.get("scale", 1.0),
    )
    if len(scaled) >= 3 and one is not None:
        best = min(scaled, key=lambda s: s.exact.mean)
        shown = ", ".join(f"s={s.edit.get('scale', 1.0):g}: {s.exact.mean:+.4f}" for s in scaled)
        lines.append(
            Finding(
                "§5.3, Fig. 5 (degenerate): BitDelta's mean magnitude (s = 1) is the best multiple of itself",
                f"ΔL {shown}",
                "det.",
                "holds" if best is one else f"departs: s = {best.edit.get('scale', 1.0):g} is lower",
                topic="bitdelta_scaled",
            )
        )
    sampled = [
        s for s in _select(settings, "bitdelta") if s.edit.get("magnitudes") != "mean" and magnitude_blocks(s.edit) == 1
    ]
    if sampled and one is not None:
        parts = [f"{s.edit['magnitudes']}: ΔL {s.exact}" for s in sampled]
        on_par = all(abs(s.exact.mean - one.exact.mean) <= COMPETITIVE * revert for s in sampled)
        lines.append(
            Finding(
                "§5.3, Fig. 5: magnitudes sampled around the mean (normal, uniform) do as well as BitDelta's mean",
                f"{'; '.join(parts)}; mean magnitude: {one.exact.mean:+.4f} (as well: within {100 * COMPETITIVE:.0f}% of R)",
                _seeds(sampled),
                _verdict(on_par),
                topic="bitdelta_sampled",
            )
        )
    return lines


def lowrank_density(edit: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> float:
    """The fraction of the numbers a LowRank config stores: ``r(d + k)`` for each 2-D tensor it truncates, every entry
    of the others, over the total number of entries (what DARE's ``1 − p`` counts)."""
    stored, total = 0, 0
    for shape in shapes.values():
        count = math.prod(shape)
        total += count
        if len(shape) != 2:
            stored += count
            continue
        rank = resolve_rank((shape[0], shape[1]), edit.get("rank"), edit.get("fraction"))
        stored += count if rank >= min(shape) else rank * (shape[0] + shape[1])
    return stored / total


def _equal_density_findings(settings: Sequence[Setting], shapes: Mapping[str, tuple[int, ...]] | None) -> list[Finding]:
    lines = []
    dare = _find(settings, "dare", p=0.9, k=0.0)
    ties = _find(settings, "magnitude_prune", p=0.9)
    if dare is not None and ties is not None:
        better = sum(row.result.exact < ties.exact.mean for row in dare.rows)
        lines.append(
            Finding(
                "§5.2, Fig. 3: at p = 0.9 TIES' magnitude trim (10 % kept) degrades compared with DARE",
                f"TIES ΔL {ties.exact.mean:+.4f} ({_split(ties)}); DARE ΔL {dare.exact}, lower on {better}/{len(dare.rows)} "
                "seeds",
                f"det./{len(dare.rows)}",
                _verdict(better == len(dare.rows)),
                topic="ties",
                p=0.9,
            )
        )
    lowrank = _select(settings, "lowrank")
    if lowrank and dare is not None:
        setting = lowrank[0]
        density = "" if shapes is None else f", {100 * lowrank_density(setting.edit, shapes):.1f}% of the numbers kept"
        lines.append(
            Finding(
                "§5.2, Fig. 3: Twin-Merging's low rank has a term > 0 and loses more than DARE at p = 0.9 (10 % kept)",
                f"low rank ({edit_parameters(setting.rows[0])}{density}): term {setting.term.mean:+.4f}, ΔL "
                f"{setting.exact.mean:+.4f}; DARE p = 0.9: ΔL {dare.exact}",
                f"det./{len(dare.rows)}",
                _verdict(setting.term.mean > 0 and setting.exact.mean > dare.exact.mean),
                topic="lowrank",
                p=0.9,
            )
        )
    return lines


def _expo_findings(settings: Sequence[Setting]) -> list[Finding]:
    lines = []
    best_side = {}
    for dataset in sorted({s.dataset for s in settings if s.family == "extrapolate" and s.scale == 1.0}):
        curve = sorted(_select(settings, "extrapolate", dataset=dataset), key=lambda s: s.edit["alpha"])
        if len(curve) < 3:
            continue
        trough = min(curve, key=lambda s: s.term.mean)
        alpha = trough.edit["alpha"]
        rises = curve[-1].term.mean > trough.term.mean and curve[0].term.mean > trough.term.mean
        shown = ", ".join(f"α={s.edit['alpha']:g}: {s.term.mean:+.4f}" for s in curve)
        holds = rises and trough.term.mean < 0 and alpha > 0 and trough.exact.mean < 0
        lines.append(
            Finding(
                f"§6.1, Fig. 6: on {dataset} EXPO's term falls then rises with α, below 0 at its trough (α > 0)",
                f"term {shown}; trough α = {alpha:g}, ΔL there {trough.exact.mean:+.4f}",
                "det.",
                _verdict(holds),
                topic="expo_trough",
            )
        )
        best = min((s for s in curve if s.edit["alpha"] != 0.0), key=lambda s: s.exact.mean)
        best_side[dataset] = ("extrapolation" if best.edit["alpha"] > 0 else "interpolation", best)
    if len(best_side) >= 2:
        sides = {side for side, _ in best_side.values()}
        shown = "; ".join(
            f"{dataset}: {side} (α = {best.edit['alpha']:g}, ΔL {best.exact.mean:+.4f}; the slope "
            f"⟨∇L(W_post), ΔW⟩ = {best.first_order.mean / best.edit['alpha']:+.4f})"
            for dataset, (side, best) in best_side.items()
        )
        lines.append(
            Finding(
                "§6.2, Fig. 7: whether interpolation or extrapolation is better depends on the data",
                shown,
                "det.",
                "holds" if len(sides) > 1 else f"departs: {sides.pop()} on both",
                topic="expo_sides",
            )
        )
    return lines


def _category(value: float, revert: float) -> str:
    if value > COMPETITIVE * revert:
        return "worse"
    return "better" if value < -COMPETITIVE * revert else "competitive"


def _sign_findings(settings: Sequence[Setting], revert: float) -> list[Finding]:
    rows = [row for setting in settings if setting.scale == 1.0 and setting.dataset == TEST for row in setting.rows]
    if not rows:
        return []
    same = [row for row in rows if _category(row.result.term, revert) == _category(row.result.exact, revert)]
    measured = f"the same class for {len(same)} of {len(rows)} rows"
    others = [row for row in rows if row not in same]
    if others:
        measured += (
            "; the others: "
            + ", ".join(
                f"{edit_family(row)} {edit_parameters(row)} (term {row.result.term:+.4f}, ΔL {row.result.exact:+.4f})"
                for row in others[:4]
            )
            + (" …" if len(others) > 4 else "")
        )
    return [
        Finding(
            f"§3.2: the term (C = {rows[0].result.num_points}) sorts edits as ΔL does: worse (> 10% of R), "
            "competitive, better (< −10% of R)",
            measured,
            "all rows",
            _verdict(not others),
            topic="term_sorts",
        )
    ]


def _scale_findings(settings: Sequence[Setting], numbers: Mapping[float, int]) -> list[Finding]:
    """The delta-scale experiment: DARE's (and drop only's) ΔL against R(s) as W_pre moves to W_post − s·ΔW."""
    scales = sorted({setting.scale for setting in settings})
    reverts = {s: revert_cost(settings, scale=s) for s in scales}
    known = {s: r for s, r in reverts.items() if r is not None and r > 0}
    if len(known) < 2:
        return []
    lines = []
    for p in sorted({st.edit["p"] for st in settings if st.family == "dare" and st.scale != 1.0}):
        dare = {s: setting for s in known if (setting := _find(settings, "dare", scale=s, p=p, k=0.0)) is not None}
        if len(dare) < 2:
            continue
        drop = {s: setting for s in known if (setting := _find(settings, "drop_only", scale=s, p=p)) is not None}
        parts = [
            f"s={s:g}: R(s) = {known[s]:.4f}, DARE ΔL {setting.exact} ({100 * setting.exact.mean / known[s]:.0f}% "
            "of R(s))" + (f", drop only {100 * drop[s].exact.mean / known[s]:.0f}%" if s in drop else "")
            for s, setting in dare.items()
        ]
        exponents = []
        for name, chosen in (("DARE", dare), ("drop only", drop), ("R", None)):
            values = {
                s: (known[s] if chosen is None else chosen[s].exact.mean) for s in (known if chosen is None else chosen)
            }
            if len(values) >= 2 and min(values.values()) > 0:
                exponents.append(f"{name} ∝ s^{loglog_slope(list(values), list(values.values())):.2f}")
        competitive = [s for s, setting in dare.items() if setting.exact.mean <= COMPETITIVE * known[s]]
        cited = f"#{numbers[p]}" if p in numbers else "the DARE rows"
        verdict = (
            f"explains {cited}: competitive at s = {', '.join(f'{s:g}' for s in competitive)}"
            if competitive
            else f"explains {cited}: a smaller ΔW alone does not help"
        )
        lines.append(
            Finding(
                f"Delta scale (the demo's experiment): W_pre = W_post − s·ΔW shrinks ΔW; DARE's cost at p = {p:g} as a "
                "share of R(s), the cost of reverting",
                "; ".join(parts) + "; " + ", ".join(exponents),
                _seeds(list(dare.values()) + list(drop.values())),
                verdict,
                topic="delta_scale",
                p=p,
            )
        )
    return lines


def findings(
    rows: Sequence[SweepRow],
    gradient_terms: Mapping[str, Any] | None = None,
    scales: Mapping[str, float] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    sizes: Mapping[str, float] | None = None,
) -> list[Finding]:
    """The paper's findings on the rows, in the paper's order, then the demo's experiments that explain departures.

    Args:
        rows: the sweep's rows.
        gradient_terms: :func:`first_order_terms` results, ``{"gradient_delta": ⟨∇L, ΔW⟩, "dare": {p: [values]},
            "drop_only": {p: [values]}}`` and optionally ``"check": {p: max |difference| to the sweep's c = 0}``.
        scales: pre-trained directory -> ``s`` of the delta-scale rows (the pair's own W_pre is 1).
        shapes: tensor name -> shape, for the low-rank edit's density.
        sizes: row key -> ``‖E‖/‖ΔW‖`` (:func:`edit_sizes`), for the curvature per size of each edit.
    """
    settings = aggregate(rows, scales)
    cost = revert_cost(settings)
    revert = cost if cost is not None and cost > 0 else None  # the findings measured against R need one
    lines: list[Finding] = []
    if revert is not None:
        lines += _dare_findings(settings, revert)
    lines += _eq6_findings(settings, gradient_terms)
    if revert is not None:
        lines += _k_findings(settings, revert)
        lines += _table1_findings(settings, revert)
        lines += _della_findings(settings, revert)
        lines += _bitdelta_findings(settings, revert)
        lines += _equal_density_findings(settings, shapes)
    lines += _expo_findings(settings)
    if revert is not None:
        lines += _sign_findings(settings, revert)
        numbers = {
            "random": [number for number, line in enumerate(lines, 1) if line.departs and line.topic in RANDOM_TOPICS],
            "structured": [
                number for number, line in enumerate(lines, 1) if line.departs and line.topic in STRUCTURED_TOPICS
            ],
        }
        lines += _why_rows(settings, revert, sizes, numbers)
    dare_rows = {line.p: number for number, line in enumerate(lines, 1) if line.topic == "dare" and line.p is not None}
    lines += _scale_findings(settings, dare_rows)
    return lines


# ------------------------------------------------------------------------------------------------ quadrature
RULE_KEYS = "riemann.rule,riemann.num_points"


def quadrature_grid(
    grid: Sequence[Mapping[str, Any]], num_points: int = 5, reference: int = 16, left: bool = True
) -> list[dict[str, Any]]:
    """Each block of ``grid`` at its first mask seed, under the paper's left rule with C = ``num_points`` (no
    backward at t = 1: C passes), Gauss–Legendre with as many nodes, and a ``reference``-node Gauss rule.

    ``left=False`` leaves the left rule out, for a sweep of ``grid`` under it that already ran (the demo's own)."""
    blocks = []
    for block in grid:
        block = dict(block)
        seeds = block.get("edit.init_args.seed")
        if isinstance(seeds, (list, tuple)):
            block["edit.init_args.seed"] = seeds[0]
        block["riemann.trapezoid"] = False
        rules = [["gauss", num_points], ["gauss", reference]]
        block[RULE_KEYS] = [["left", num_points], *rules] if left else rules
        blocks.append(block)
    return blocks


def _setting_key(row: SweepRow) -> str:
    pretrained = (row.config.get("model") or {}).get("pretrained")
    return repr((sorted(row.edit.items()), row.dataset, str(pretrained)))


def per_tensor_error(result: Any, reference: Any) -> float:
    """``max_k |term_k − reference_k| / max_k |reference_k|``: the worst per-tensor error as a share of the largest
    per-tensor term of the reference."""
    largest = max(abs(value) for value in reference.term_per_tensor.values())
    worst = max(abs(result.term_per_tensor[name] - value) for name, value in reference.term_per_tensor.items())
    return worst / largest if largest > 0 else math.inf


def quadrature_findings(rows: Sequence[SweepRow]) -> list[Finding]:
    """The paper's left rule against Gauss–Legendre at equal passes over every setting of ``rows``.

    ``rows``: a sweep of :func:`quadrature_grid` (each setting under the left rule with C passes, Gauss with C nodes
    and a Gauss reference with more). Per setting, :func:`per_tensor_error` of both against the reference; the row
    holds when Gauss is the more accurate at every setting.
    """
    groups: dict[str, list[SweepRow]] = defaultdict(list)
    for row in rows:
        groups[_setting_key(row)].append(row)
    errors = []  # (setting, left error, gauss error)
    passes = reference_nodes = None
    for members in groups.values():
        left = [row for row in members if row.result.rule == "left" and row.result.trapezoid is None]
        if not left:
            continue
        passes = _passes(left[0])
        gauss = [row for row in members if row.result.rule == "gauss" and _passes(row) == passes]
        references = sorted(
            (row for row in members if row.result.rule == "gauss" and _passes(row) > passes), key=_passes
        )
        if not gauss or not references:
            continue
        reference = references[-1].result
        reference_nodes = reference.passes
        label = f"{edit_label(left[0])} ({left[0].dataset})"
        errors.append(
            (label, per_tensor_error(left[0].result, reference), per_tensor_error(gauss[0].result, reference))
        )
    if not errors:
        return []
    by_left = sorted(errors, key=lambda item: item[1])
    by_gauss = sorted(errors, key=lambda item: item[2])
    median = len(errors) // 2
    better = [item for item in errors if item[2] < item[1]]
    measured = (
        f"left rule: median {by_left[median][1]:.2g}, worst {by_left[-1][1]:.2g} ({by_left[-1][0]}); Gauss: "
        f"median {by_gauss[median][2]:.2g}, worst {by_gauss[-1][2]:.2g} ({by_gauss[-1][0]}); Gauss more "
        f"accurate at {len(better)} of {len(errors)} settings"
    )
    worse = [item[0] for item in errors if item not in better]
    verdict = "holds" if not worse else "departs at " + ", ".join(worse[:3]) + (" …" if len(worse) > 3 else "")
    return [
        Finding(
            f"Beyond the paper: Gauss–Legendre against the paper's left rule at equal passes ({passes}), worst "
            f"per-tensor error as a share of the largest per-tensor term of a {reference_nodes}-node Gauss "
            "reference",
            measured,
            "1",
            verdict,
            topic="quadrature",
        )
    ]


def _passes(row: SweepRow) -> int:
    """The row's backward passes per batch (the result of every sweep counts them)."""
    assert row.result.passes is not None
    return row.result.passes


# ------------------------------------------------------------------------------------------------------ tables
def _cell(value: str) -> str:
    return value.replace("|", "\\|")


def findings_table(lines: Sequence[Finding]) -> str:
    """The findings as a Markdown table: #, the paper's finding, measured here, seeds, verdict."""
    out = [
        "| # | the paper's finding | measured here (mean ± std over seeds) | seeds | verdict |",
        "|---:|---|---|---|---|",
    ]
    for number, line in enumerate(lines, 1):
        out.append(f"| {number} | {_cell(line.claim)} | {_cell(line.measured)} | {line.seeds} | {line.verdict} |")
    return "\n".join(out)


def holds(verdict: str) -> bool | None:
    """Whether a verdict says the paper's finding holds (every part of it), ``None`` for the demo's own experiments
    (their verdicts explain other rows).

    Example:
        >>> holds("holds"), holds("holds at c = 0; holds at c ≥ 1"), holds("departs at k = 0.5"), holds("explains #2")
        (True, True, False, None)
    """
    if verdict.startswith(("explains", "(measured)")):
        return None
    return "departs" not in verdict


def over_pairs_table(labels: Sequence[str], findings_per_pair: Sequence[Sequence[Finding]]) -> str:
    """The findings of several pairs side by side, matched by claim (in the first pair's order): each pair's verdict
    and on how many of the pairs that produced it the finding holds. A claim a pair did not produce shows ``—``
    there."""
    out = [
        "| # | the paper's finding | " + " | ".join(labels) + " | holds on |",
        "|---:|---|" + "---|" * len(labels) + "---|",
    ]
    by_claim = [{line.claim: line.verdict for line in lines} for lines in findings_per_pair]
    for number, line in enumerate(findings_per_pair[0], 1):
        verdicts = [claims.get(line.claim) for claims in by_claim]
        counted = [holds(verdict) for verdict in verdicts if verdict is not None]
        known = [value for value in counted if value is not None]
        tally = "—" if len(known) < len(counted) else f"{sum(known)} of {len(counted)}"
        cells = " | ".join(_cell(verdict) if verdict is not None else "—" for verdict in verdicts)
        out.append(f"| {number} | {_cell(line.claim)} | {cells} | {tally} |")
    return "\n".join(out)


def settings_table(settings: Sequence[Setting]) -> str:
    """Every setting as a Markdown row: edit, parameters, data, s, seeds, term, exact ΔL, accuracy (mean ± std)."""
    out = [
        "| edit | params | data | s | seeds | term | exact ΔL | accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting in settings:
        accuracy = setting.accuracy
        shown = (
            "—"
            if accuracy is None
            else (
                f"{100 * accuracy.mean:.1f}%"
                if accuracy.n == 1
                else f"{100 * accuracy.mean:.1f} ± {100 * accuracy.std:.1f}%"
            )
        )
        out.append(
            f"| {setting.family} | {edit_parameters(setting.rows[0])} | "
            f"{setting.dataset} | {setting.scale:g} | {len(setting.rows) if setting.randomised else 'det.'} | "
            f"{setting.term} | {setting.exact} | {shown} |"
        )
    return "\n".join(out)


def table1(rows: Sequence[SweepRow], p: float = 0.9, scales: Mapping[str, float] | None = None) -> str:
    """The paper's Table 1 in its layout: one row per k; the random k extension (mean ± std over its seeds), the
    sign-biased and the gradient-biased rescale; accuracy in % (as the paper's GSM8K accuracy) and ΔL."""
    table = table1_settings(aggregate(rows, scales), p)
    out = [f"| k | Random (DARE extension, p = {p:g}) | Biased ΔW | Biased ΔW·∇L |", "|---:|---|---|---|"]

    def cell(setting: Setting | None) -> str:
        if setting is None:
            return "—"
        accuracy = setting.accuracy
        if accuracy is None:
            return f"ΔL {setting.exact}"
        shown = (
            f"{100 * accuracy.mean:.1f}" if accuracy.n == 1 else f"{100 * accuracy.mean:.1f} ± {100 * accuracy.std:.1f}"
        )
        return f"{shown} (ΔL {setting.exact})"

    for k, columns in table.items():
        out.append(f"| {k:g} | {cell(columns['random'])} | {cell(columns['sign'])} | {cell(columns['gradient'])} |")
    return "\n".join(out)


def regime_table(regime: Mapping[str, Mapping[str, float]]) -> str:
    """``‖ΔW‖/‖W_pre‖`` per kind of module (:func:`lightning_delta.demo.pair.delta_regime`) as a Markdown table."""
    out = ["| module | parameters | ‖ΔW‖ | ‖W_pre‖ | ‖ΔW‖/‖W_pre‖ |", "|---|---:|---:|---:|---:|"]
    for group, values in sorted(regime.items(), key=lambda item: (item[0] == "all", item[0])):
        out.append(
            f"| {group} | {values['parameters']:,} | {values['delta_norm']:.4f} | {values['pre_norm']:.3f} | "
            f"{100 * values['ratio']:.2f}% |"
        )
    return "\n".join(out)
