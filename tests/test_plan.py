"""lightning_delta.planning: scores against float64 brute force, the knapsack against enumeration, the budget, the
measured exact ΔL against an independent loss loop, and the `plan` command."""

from __future__ import annotations

import copy
import itertools
import json
import random
import shlex
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from scipy.stats import kendalltau
from torch import nn

from benchmarks.plan import misordered_pairs
from lightning_delta import apply_edit_
from lightning_delta.cli import run
from lightning_delta.demo.digits import DigitsDataModule
from lightning_delta.edits import DARE, BitDelta, LowRank, MagnitudePrune, PerTensor, tensor_generator
from lightning_delta.export import PER_TENSOR_FILE
from lightning_delta.losses import LossOutput
from lightning_delta.module import DeltaEditModule
from lightning_delta.planning.allocate import allocate
from lightning_delta.planning.family import FAMILIES, family
from lightning_delta.planning.measure import exact_candidate_changes, riemann_sweep, trapezoid_per_tensor
from lightning_delta.planning.plan import Plan, plan_edit, relevant_values, run_planning
from lightning_delta.planning.scores import GradientStatistics, candidate_scores, gradient_statistics
from tests.support.tiny_models import make_tiny_model


# ------------------------------------------------------------------------------------- gradient statistics
class SumOfSquares:
    """A target whose loss is Σ_i ½‖model(x_i) − y_i‖² over the batch's items."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def riemann_prepare(self, batch):
        return batch

    def riemann_loss(self, batch, batch_idx=0):
        x, y = batch
        total = 0.5 * ((self.model(x) - y) ** 2).sum()
        return LossOutput(total, torch.tensor(float(len(x)), dtype=torch.float64))


def small_model_and_batches(sizes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    batches = [(torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)) for n in sizes]
    return model, batches


def reference_statistics(model, batches):
    """g and F̂ by explicit float64 loops: per-batch gradients G_b, then the centred formula; and per item."""
    target, parameters = SumOfSquares(model), dict(model.named_parameters())
    per_batch, per_item = [], []
    for x, y in batches:
        per_batch.append((len(x), torch.autograd.grad(target.riemann_loss((x, y)).total, list(parameters.values()))))
        for i in range(len(x)):
            per_item.append(
                torch.autograd.grad(target.riemann_loss((x[i : i + 1], y[i : i + 1])).total, list(parameters.values()))
            )
    N = sum(n for n, _ in per_batch)  # noqa: N806
    gradient, fisher, item_fisher = {}, {}, {}
    for j, name in enumerate(parameters):
        g = sum(G[j] for _, G in per_batch) / N
        gradient[name] = g
        fisher[name] = sum((G[j] - n * g) ** 2 for n, G in per_batch) / N + g**2
        item_fisher[name] = sum(G[j] ** 2 for G in per_item) / N
    return gradient, fisher, item_fisher


def test_gradient_statistics_equal_explicit_float64_loops():
    model, batches = small_model_and_batches([3, 1, 4, 2])
    stats = gradient_statistics(SumOfSquares(model), model, [batches], [name for name, _ in model.named_parameters()])
    gradient, fisher, _ = reference_statistics(model, batches)
    assert stats.count == 10 and stats.batches == 4
    for name in gradient:
        assert stats.gradient[name].dtype == torch.float64
        torch.testing.assert_close(stats.gradient[name], gradient[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stats.fisher[name], fisher[name], rtol=1e-10, atol=1e-14)
    assert all(parameter.grad is None and parameter.requires_grad for parameter in model.parameters())


def test_with_one_item_per_batch_the_fisher_is_the_per_item_empirical_fisher():
    model, batches = small_model_and_batches([1] * 6)
    stats = gradient_statistics(SumOfSquares(model), model, [batches], [name for name, _ in model.named_parameters()])
    _, _, item_fisher = reference_statistics(model, batches)
    for name, expected in item_fisher.items():
        torch.testing.assert_close(stats.fisher[name], expected, rtol=1e-10, atol=1e-14)


def test_gradient_statistics_of_a_subset_leave_the_other_parameters_alone():
    model, batches = small_model_and_batches([2, 2])
    model[0].bias.requires_grad_(False)
    stats = gradient_statistics(SumOfSquares(model), model, [batches], ["2.weight"])
    assert list(stats.gradient) == ["2.weight"]
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    with pytest.raises(ValueError, match=r"\['nope'\] are not parameters of Sequential"):
        gradient_statistics(SumOfSquares(model), model, [batches], ["nope"])


# ----------------------------------------------------------------------------------------- candidate scores
@pytest.mark.parametrize(
    ("name", "values"),
    [("bitdelta", [1, 2, 3]), ("dare", [0.1, 0.5]), ("lowrank", [1, 3]), ("magnitude_prune", [0.25, 0.75])],
)
@pytest.mark.slow
def test_candidate_scores_equal_explicit_float64_sums(name, values):
    pre = make_tiny_model("llama", seed=0, dtype=torch.float64).state_dict()
    generator = torch.Generator().manual_seed(1)
    post = {
        key: value + 0.01 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
        for key, value in pre.items()
    }
    stats = GradientStatistics(
        {key: torch.randn(v.shape, generator=generator, dtype=torch.float64) for key, v in post.items()},
        {key: torch.rand(v.shape, generator=generator, dtype=torch.float64) for key, v in post.items()},
        1.0,
        1,
    )
    spec = family(name)
    scores = candidate_scores(post, pre, spec, values, stats, seed=4)
    expected_names = [key for key in post if name != "lowrank" or post[key].dim() == 2]
    assert scores.names == expected_names
    explicit_edits = {
        "bitdelta": lambda v: BitDelta(bits=v),
        "dare": lambda v: DARE(p=1 - v, seed=4),
        "lowrank": lambda v: LowRank(rank=v),
        "magnitude_prune": lambda v: MagnitudePrune(p=1 - v),
    }[name]
    for k, key in enumerate(scores.names):
        delta = post[key] - pre[key]
        for j, value in enumerate(values):
            E = explicit_edits(value)({key: delta})[key] - delta  # noqa: N806
            first = sum(float(a) * float(b) for a, b in zip(stats.gradient[key].flatten(), E.flatten()))
            curvature = 0.5 * float((stats.fisher[key] * E * E).sum())
            assert float(scores.first[k, j]) == pytest.approx(first, rel=1e-10, abs=1e-15)
            assert float(scores.curvature[k, j]) == pytest.approx(curvature, rel=1e-12, abs=1e-18)
            weight = delta.numel() if name != "lowrank" else sum(delta.shape)
            assert scores.costs[k][j] == Fraction(str(value)) * weight


# --------------------------------------------------------------------------------------------- allocation
def brute_force(scores, costs, budget):
    best = None
    for combo in itertools.product(*(range(len(row)) for row in scores)):
        if sum(costs[k][j] for k, j in enumerate(combo)) <= budget:
            value = sum(scores[k][j] for k, j in enumerate(combo))
            best = value if best is None or value < best else best
    return best


@pytest.mark.slow
def test_allocation_is_optimal_against_brute_force_enumeration():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        K, V = rng.randint(1, 6), rng.randint(1, 4)  # noqa: N806
        scores = [[rng.gauss(0, 1) for _ in range(V)] for _ in range(K)]
        costs = [[Fraction(rng.randint(0, 20), rng.choice([1, 2, 5])) for _ in range(V)] for _ in range(K)]
        budget = Fraction(rng.randint(0, 60), 2)
        best = brute_force(scores, costs, budget)
        if best is None:
            with pytest.raises(ValueError, match="below the cheapest plan"):
                allocate(scores, costs, budget)
            continue
        picked = allocate(scores, costs, budget)
        assert sum(costs[k][j] for k, j in enumerate(picked)) <= budget  # exact rationals: no tolerance
        assert sum(scores[k][j] for k, j in enumerate(picked)) == pytest.approx(best, abs=1e-12)
        checked += 1
    assert checked > 200


def test_allocation_meets_the_budget_exactly_when_only_the_full_budget_is_optimal():
    scores = [[0.0, -1.0], [0.0, -1.0], [0.0, -1.0]]
    costs = [[Fraction(1, 10), Fraction(3, 10)]] * 3
    assert allocate(scores, costs, Fraction(7, 10)) in ([1, 1, 0], [1, 0, 1], [0, 1, 1])
    assert allocate(scores, costs, Fraction(9, 10)) == [1, 1, 1]  # 0.3 · 3 = 0.9 exactly, no float rounding


def test_allocation_with_rounded_costs_still_meets_the_budget():
    rng = random.Random(1)
    for _ in range(50):
        scores = [[rng.gauss(0, 1) for _ in range(3)] for _ in range(5)]
        costs = [[Fraction(rng.randint(1, 1000)) for _ in range(3)] for _ in range(5)]
        budget = Fraction(sum(max(row) + min(row) for row in costs), 2)
        picked = allocate(scores, costs, budget, max_states=60)
        assert sum(costs[k][j] for k, j in enumerate(picked)) <= budget


def test_benchmark_misordered_pairs_are_the_discordant_pairs_of_kendalls_tau():
    generator = torch.Generator().manual_seed(0)
    scores, exact = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    pairs = 5 * 4 // 2
    expected = sum(round((1 - kendalltau(a.numpy(), b.numpy())[0]) * pairs / 2) for a, b in zip(scores, exact))
    assert misordered_pairs(scores, exact) == expected
    assert misordered_pairs(exact, exact) == 0


def test_relevant_values_counts_chosen_settings_and_their_neighbours():
    assert relevant_values([1, 1, 3], 4) == [1, 2, 0, 3]
    assert relevant_values([0], 3) == [0, 1]


# ------------------------------------------------------------------------------------------- the whole plan
# The library's loss takes float32 logits, the explicit one float64: losses near 4.8 then differ by a few float32
# ulps (4.8 · 2^-23 ≈ 6e-7), and so do their differences.
FLOAT32_LOSS = 2e-6


def explicit_loss(model, datamodule) -> float:
    """The mean next-token cross-entropy over answer tokens, by an explicit float64 loop (no library loss)."""
    datamodule.setup("validate")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            labels = batch["labels"][:, 1:]
            total += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            count += int((labels != -100).sum())
    return total / count


def check_plan(plan: Plan, pair, values, average, datamodule) -> None:
    spec = FAMILIES[plan.family]
    weights = {name: spec.weight(pair.post.state_dict()[name].shape) for name in plan.settings}
    assert plan.budget == float(sum(Fraction(str(average)) * w for w in weights.values()))
    assert plan.cost == float(sum(Fraction(str(plan.settings[n])) * w for n, w in weights.items()))
    assert plan.cost <= plan.budget
    assert set(plan.settings.values()) <= set(values)
    assert plan.chosen == min(plan.measured, key=plan.measured.get) and plan.exact == plan.measured[plan.chosen]
    if average in values:  # the uniform edit is always a measured proposal: the plan is never worse on this data
        assert plan.exact <= plan.measured["uniform"]
        uniform = apply_edit_(copy.deepcopy(pair.post), pretrained=pair.pre, edit=spec.edit(average, plan.seed))
        assert plan.measured["uniform"] == pytest.approx(
            explicit_loss(uniform, datamodule) - explicit_loss(pair.post, datamodule), rel=1e-5, abs=FLOAT32_LOSS
        )
    post = copy.deepcopy(pair.post)
    edited = apply_edit_(copy.deepcopy(pair.post), pretrained=pair.pre, edit=plan.edit())
    assert plan.loss_post == pytest.approx(explicit_loss(post, datamodule), rel=1e-6)
    assert plan.exact == pytest.approx(
        explicit_loss(edited, datamodule) - explicit_loss(post, datamodule), rel=1e-5, abs=FLOAT32_LOSS
    )


@pytest.mark.slow
def test_plan_edit_with_its_defaults(llama_pair):
    datamodule = DigitsDataModule(limit=24, batch_size=12)
    plan = plan_edit(
        str(llama_pair.post_dir),
        pretrained=str(llama_pair.pre_dir),
        datamodule=datamodule,
        family_name="bitdelta",
        average=2,
    )
    check_plan(plan, llama_pair, FAMILIES["bitdelta"].default_candidates, 2, datamodule)
    assert plan.passes["forward_backward"] == 1 + len(plan.refined) * (5 + 1)
    assert plan.refined and set(plan.refined) <= {1, 2, 3, 4}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "values", "average"), [("dare", [0.1, 0.3, 0.5], 0.3), ("lowrank", [1, 2], 1.5)])
def test_plan_edit_meets_the_budget_and_measures_its_exact_loss_change(llama_pair, name, values, average):
    datamodule = DigitsDataModule(limit=24, batch_size=12)
    plan = plan_edit(
        llama_pair.post,
        pretrained=llama_pair.pre,
        datamodule=datamodule,
        family_name=name,
        average=average,
        candidates=values,
        refine=1,
        num_points=2,
        seed=3,
    )
    check_plan(plan, llama_pair, values, average, datamodule)
    assert len(plan.refined) == 1 and plan.passes["forward_backward"] == 1 + 3
    assert isinstance(plan.edit(), PerTensor) and json.loads(json.dumps(plan.to_dict()))["edit"]["name"] == "per_tensor"


def test_plan_without_refinement_uses_the_taylor_scores_only(llama_pair):
    datamodule = DigitsDataModule(limit=12, batch_size=12)
    plan = plan_edit(
        llama_pair.post,
        pretrained=llama_pair.pre,
        datamodule=datamodule,
        family_name="bitdelta",
        average=2,
        candidates=[1, 3],
        refine=0,
        measure=False,
    )
    assert plan.refined == [] and plan.exact is None and plan.passes == {"forward_backward": 1, "forward": 0}
    assert plan.predicted == pytest.approx(plan.predicted_second)


def test_plan_command_writes_the_plan_and_the_edited_model(llama_pair, tmp_path):
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": "test", "limit": 12, "batch_size": 12},
        },
        "family": "bitdelta",
        "average": 2,
        "candidates": [1, 2, 3],
        "num_points": 2,
        "refine": 1,
        "output": str(tmp_path / "plan.json"),
        "output_dir": str(tmp_path / "model"),
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = run(["plan", "--config", str(path)])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["settings"] == plan.settings and written["cost"] <= written["budget"]
    assert json.loads((tmp_path / "model" / PER_TENSOR_FILE).read_text()) == plan.edit().config()


@pytest.mark.slow
def test_plan_command_with_its_defaults(llama_pair, tmp_path, monkeypatch):
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule", "init_args": {"limit": 12}},
        "family": "lowrank",
        "average": 2,
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    plan = run(["plan", "--config", "plan.yaml"])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["settings"] == plan.settings and set(plan.settings.values()) <= {1, 2, 4, 8}
    assert plan.cost <= plan.budget and plan.passes["forward_backward"] == 1 + len(plan.refined) * 6


def test_sweep_shares_sum_to_the_trapezoid_and_the_model_comes_back(llama_pair):
    model = copy.deepcopy(llama_pair.post)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = riemann_sweep(
        model,
        pretrained=llama_pair.pre,
        edit=BitDelta(bits=2),
        datamodule=DigitsDataModule(limit=12, batch_size=6),
        include=["q_proj", "up_proj"],
        num_points=2,
    )
    shares = trapezoid_per_tensor(result)
    assert set(shares) == {name for name in before if "q_proj" in name or "up_proj" in name}
    assert sum(shares.values()) == pytest.approx(result.trapezoid, rel=1e-12)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_exact_candidate_changes_equal_apply_edit_and_an_explicit_loss():
    pre, post = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=0)
    with torch.no_grad():
        for parameter in post.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    datamodule = DigitsDataModule(limit=12, batch_size=6)
    datamodule.setup("validate")
    names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    edits = [BitDelta(bits=1), DARE(p=0.5, seed=2)]
    target = DeltaEditModule(post, pretrained=pre, edit=edits[0])
    changes, passes = exact_candidate_changes(
        target, post, pretrained=pre, names=names, edits=edits, loaders=[datamodule.val_dataloader()]
    )
    assert passes == 2 * 2 + 1
    base = explicit_loss(post, datamodule)
    for k, name in enumerate(names):
        for j, edit in enumerate(edits):
            edited = apply_edit_(copy.deepcopy(post), pretrained=pre, edit=edit, include=[f"^{name}$"])
            assert float(changes[k, j]) == pytest.approx(
                explicit_loss(edited, datamodule) - base, rel=1e-5, abs=FLOAT32_LOSS
            )


# ------------------------------------------------------------------------------------------- byte budgets
def compact_bytes(family_name: str, value, delta: torch.Tensor, edited: torch.Tensor) -> int:
    """The bytes of ``edited`` stored compactly, counted from the edited tensor itself (float32 values, 4 bytes; bit
    arrays of ``ceil(n/8)`` bytes; positions as a bitmap or int32 indices, whichever is smaller)."""
    entries = delta.numel()
    bitmap = -(-entries // 8)

    def positions(count: int) -> int:
        return 0 if count == 0 else min(bitmap, 4 * count)

    if family_name == "bitdelta":
        magnitudes = torch.unique(edited.abs())
        assert len(magnitudes[magnitudes > 0]) <= 2 ** (value - 1)  # block indices fit in value - 1 bits
        return value * bitmap + 2 ** (value - 1) * 4 + positions(int((edited == 0).sum()))
    if family_name == "lowrank":
        U, S, Vh = torch.linalg.svd(edited.double())  # noqa: N806
        kept = int((S > S[0] * 1e-6).sum())
        assert kept <= value
        return value * (U.shape[0] + Vh.shape[1]) * 4
    kept = int(torch.count_nonzero(edited))
    return kept * 4 + positions(kept)  # the values and their positions


@pytest.mark.parametrize(
    ("name", "value"), [("bitdelta", 1), ("bitdelta", 3), ("magnitude_prune", 0.25), ("lowrank", 2)]
)
def test_stored_bytes_count_the_compact_form_of_the_edited_tensor(name, value):
    torch.manual_seed(0)
    delta = torch.randn(16, 8)
    delta[0, :3] = 0.0  # exact zeros: BitDelta keeps them at 0, and stores where they are
    spec = FAMILIES[name]
    edited = spec.edit(value).edit_tensor("w", delta)
    assert spec.stored_bytes(value, delta.shape, 4, edited) == compact_bytes(name, value, delta, edited)


def test_dare_stored_bytes_count_the_mask_actually_drawn():
    torch.manual_seed(0)
    delta = torch.randn(64, 64)
    delta[:2] = 0.0  # kept or not, an exact zero stores nothing
    spec, n = FAMILIES["dare"], 64 * 64
    assert spec.stored_bytes(0.2, delta.shape, 2) == Fraction(2 * 2 * n, 10) + n // 8  # expected: d·n·e + bitmap
    sizes = set()
    for seed in range(5):
        draws = torch.rand(n, generator=tensor_generator(seed, "w"), dtype=torch.float32)  # DARE's mask, rebuilt
        kept = int(((draws >= 0.8) & (delta.reshape(-1) != 0)).sum())
        edited = DARE(p=0.8, seed=seed).edit_tensor("w", delta)
        assert spec.stored_bytes(0.2, delta.shape, 4, edited) == kept * 4 + min(n // 8, kept * 4)
        sizes.add(kept)
    assert len(sizes) > 1  # the counts differ between seeds, and so do the bytes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bitdelta", "lowrank"])
def test_plan_under_a_byte_budget_stores_no_more_than_it(llama_pair, name):
    values = [1, 2, 4]
    weights = {name_: tensor for name_, tensor in llama_pair.post.state_dict().items()}
    spec = FAMILIES[name]
    planned = [
        n
        for n, t in weights.items()
        if spec.applies(t.shape)
        and n in dict(llama_pair.post.named_parameters())
        and not torch.equal(t, llama_pair.pre.state_dict()[n])
    ]
    uniform_2 = sum(spec.stored_bytes(2, weights[n].shape, 4) for n in planned)
    budget = float(uniform_2 + 100)  # the uniform edit at 2 fits, at 4 does not
    datamodule = DigitsDataModule(limit=24, batch_size=12)
    plan = plan_edit(
        llama_pair.post,
        pretrained=llama_pair.pre,
        datamodule=datamodule,
        family_name=name,
        candidates=values,
        refine=1,
        num_points=2,
        budget_bytes=budget,
    )
    assert set(plan.settings) == set(planned) and plan.average is None and plan.budget_bytes == budget
    stored = sum(
        compact_bytes(
            name,
            plan.settings[n],
            weights[n] - llama_pair.pre.state_dict()[n],
            spec.edit(plan.settings[n]).edit_tensor(n, weights[n] - llama_pair.pre.state_dict()[n]),
        )
        for n in planned
    )
    assert plan.cost == plan.stored_bytes == float(stored) <= plan.budget == budget
    assert plan.chosen == min(plan.measured, key=plan.measured.get)
    if 2 in plan.refined:  # the uniform edit compared with is the largest setting that fits: 2
        assert plan.measured["uniform"] == pytest.approx(
            explicit_loss(
                apply_edit_(copy.deepcopy(llama_pair.post), pretrained=llama_pair.pre, edit=spec.edit(2)), datamodule
            )
            - explicit_loss(llama_pair.post, datamodule),
            rel=1e-5,
            abs=FLOAT32_LOSS,
        )


def test_plan_command_with_a_byte_budget(llama_pair, tmp_path):
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule", "init_args": {"limit": 12}},
        "family": "dare",
        "budget_bytes": 20000,
        "refine": 0,
        "output": str(tmp_path / "plan.json"),
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    plan = run(["plan", "--config", str(tmp_path / "plan.yaml")])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["budget_bytes"] == 20000 and written["stored_bytes"] == plan.cost <= 20000


def readme_plan_commands() -> list[list[str]]:
    """The README's `lightning-delta plan` lines (its planning section's bash block), comments dropped."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Planning an edit per tensor") :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_plan_commands_run_as_written(llama_pair, tmp_path, monkeypatch):
    commands = readme_plan_commands()
    assert len(commands) == 3 and all(command[:2] == ["lightning-delta", "plan"] for command in commands)
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule", "init_args": {"limit": 12}},
        "family": "bitdelta",
        "average": 2,
        "refine": 1,
        "num_points": 2,
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    plans = [run(command[1:]) for command in commands]
    assert plans[0].average == 2 and plans[0].cost <= plans[0].budget
    assert plans[1].budget_bytes == 2e9 and plans[1].average is None and plans[1].stored_bytes <= 2e9
    assert "uniform" in plans[1].measured  # the largest uniform setting that fits, 4 bits, measured too
    assert json.loads((tmp_path / "edited" / PER_TENSOR_FILE).read_text()) == plans[2].edit().config()


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"family_name": "ties"},
            r"unknown edit family 'ties'; choose one of \['bitdelta', 'dare', 'magnitude_prune', 'lowrank'\]",
        ),
        ({"average": 0.5}, r"`average` .* must be a number >= the smallest candidate 1, got average=0.5"),
        ({"candidates": [0, 2]}, r"candidates .* must be integers >= 1, got 0"),
        ({"candidates": [1.5]}, r"must be integers >= 1, got 1.5"),
        ({"candidates": []}, "give at least one candidate"),
        ({"candidates": [float("nan")]}, "must be finite numbers, got nan"),
        ({"candidates": ["2"]}, "must be finite numbers, got '2'"),
        ({"refine": -1}, r"`refine` must be None or an int >= 0 \(settings swept\), got refine=-1"),
        (
            {"budget_bytes": 1000},
            r"give the budget as `average` .* or as `budget_bytes`, exactly one; got average=2 "
            r"and budget_bytes=1000",
        ),
        ({"average": None}, r"exactly one; got average=None and budget_bytes=None"),
        (
            {"average": None, "budget_bytes": -5},
            r"`budget_bytes` must be a positive finite number of bytes, got "
            r"budget_bytes=-5",
        ),
        ({"average": None, "budget_bytes": 10}, r"the budget 10 is below the cheapest plan"),
    ],
)
def test_bad_plan_arguments_are_refused_naming_the_value(llama_pair, kwargs, match):
    arguments = {"family_name": "bitdelta", "average": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_edit(llama_pair.post, pretrained=llama_pair.pre, datamodule=DigitsDataModule(limit=4), **arguments)


def plan_in_a_process_group(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        plan_edit(
            nn.Linear(2, 2),
            pretrained=nn.Linear(2, 2),
            datamodule=DigitsDataModule(limit=4),
            family_name="bitdelta",
            average=2,
        )
    except ValueError as error:
        (Path(out_dir) / f"{rank}.txt").write_text(str(error))
    finally:
        torch.distributed.barrier()  # both processes leave together (gloo aborts a peer it is torn down under)
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_a_process_of_a_distributed_job_is_refused(tmp_path):
    torch.multiprocessing.spawn(plan_in_a_process_group, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        message = (tmp_path / f"{rank}.txt").read_text()
        assert "the planner runs in one process" in message and "one of 2 processes" in message


def test_dare_candidates_outside_the_unit_interval_are_refused(llama_pair):
    with pytest.raises(ValueError, match=r"dare candidates \(kept density\) must be in \(0, 1\], got 1.5"):
        plan_edit(
            llama_pair.post,
            pretrained=llama_pair.pre,
            datamodule=DigitsDataModule(limit=4),
            family_name="dare",
            average=0.5,
            candidates=[0.5, 1.5],
        )


@pytest.mark.slow
def test_plan_refines_with_the_gauss_terms_when_asked(llama_pair):
    """rule="gauss": each refinement sweep runs its n nodes (no backward at t = 1, forwards at t = 0 and 1), and the
    refined scores are the sweep's Gauss per-tensor terms, which equal a RiemannCallback run of the same rule."""
    datamodule = DigitsDataModule(limit=24, batch_size=12)
    planning = run_planning(
        llama_pair.post,
        pretrained=llama_pair.pre,
        datamodule=datamodule,
        family_name="bitdelta",
        average=2,
        candidates=[1, 3],
        refine=1,
        num_points=2,
        rule="gauss",
    )
    plan = planning.plan
    ((value, sweep),) = planning.sweeps.items()
    assert sweep.rule == "gauss" and sweep.passes == 2 and plan.refined == [value]
    column = planning.used[:, [1, 3].index(value)].tolist()
    assert column == [sweep.term_per_tensor[name] for name in planning.scores.names]
    assert plan.passes["forward_backward"] == 1 + 2 and plan.passes["forward"] % 2 == 0 and plan.passes["forward"] >= 2
    direct = riemann_sweep(
        copy.deepcopy(llama_pair.post),
        pretrained=llama_pair.pre,
        edit=BitDelta(bits=value),
        datamodule=datamodule,
        include=list(planning.scores.names),
        num_points=2,
        rule="gauss",
    )
    assert direct.term_per_tensor == pytest.approx(sweep.term_per_tensor, rel=1e-6, abs=1e-9)


def test_plan_command_takes_a_rule(llama_pair, tmp_path):
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {
            "class_path": "lightning_delta.demo.digits.DigitsDataModule",
            "init_args": {"split": "test", "limit": 12, "batch_size": 12},
        },
        "family": "bitdelta",
        "average": 2,
        "candidates": [1, 2, 3],
        "refine": 1,
        "output": str(tmp_path / "plan.json"),
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    plan = run(["plan", "--config", str(tmp_path / "plan.yaml"), "--rule", "gauss"])
    assert plan.passes["forward_backward"] == 1 + 3  # gauss's own 3 nodes for the one refined setting
    with pytest.raises(ValueError, match="rule.*'trapezoid', 'gauss' or 'adaptive'.*'left'"):
        plan_edit(
            llama_pair.post,
            pretrained=llama_pair.pre,
            datamodule=DigitsDataModule(limit=12),
            family_name="bitdelta",
            average=2,
            rule="left",
        )


def test_a_second_plan_into_the_same_output_is_refused_without_overwrite(llama_pair, tmp_path, monkeypatch):
    """``plan.json`` is not written over silently (as ``edit`` refuses a non-empty directory): refused before any
    pass over the data, the old file left as it was; ``--overwrite true`` replaces it."""
    config = {
        "model": str(llama_pair.post_dir),
        "pretrained": str(llama_pair.pre_dir),
        "data": {"class_path": "lightning_delta.demo.digits.DigitsDataModule", "init_args": {"limit": 12}},
        "family": "bitdelta",
        "average": 2,
        "refine": 0,
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "plan.json").write_text('{"an": "earlier plan"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"output plan\.json exists; refusing to write a plan over it\. Pass "
        r"--overwrite true",
    ):
        run(["plan", "--config", "plan.yaml"])
    assert (tmp_path / "plan.json").read_text() == '{"an": "earlier plan"}\n'
    plan = run(["plan", "--config", "plan.yaml", "--overwrite", "true"])
    assert json.loads((tmp_path / "plan.json").read_text())["settings"] == plan.settings
