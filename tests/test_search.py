"""Phases II and III on the smoke profile (tiny in-process model), and their operators on toy spaces."""
import numpy as np
import pytest

from qr_lib import fitness, search
from qr_lib.allocation import Allocation
from qr_lib.config import load_profile
from qr_lib.errors import QRError
from qr_lib.memory import model_shapes
from qr_lib.models import tiny_llama
from qr_lib.quant import QuantConfig
from qr_lib.search import bo, nsga
from qr_lib.search import problem as P

Q = QuantConfig(group_size=64, hqq_optimize=False)
BITS, RANKS = (2, 3, 4, 8), (4, 8, 16)


def _space(kl2=(0.5, 0.1, 0.2, 0.05), budget_bits=4, budget_rank=8, rank_weight=0.1):
    from qr_lib.memory import budget_bytes
    shapes = model_shapes(tiny_llama())
    return P.search_space(shapes, Q, BITS, RANKS, {"2": list(kl2)}, budget_bytes(shapes, Q, budget_bits, budget_rank),
                          rank_weight)


# -- hypervolume and Pareto sets ---------------------------------------------------------------
def test_hypervolume_of_known_fronts():
    assert P.hypervolume([[0.1, 0.5], [0.3, 0.2]], (1, 1)) == pytest.approx(0.66)
    assert P.hypervolume([[0.1, 0.5], [0.3, 0.2], [0.4, 0.6]], (1, 1)) == pytest.approx(0.66)  # dominated
    assert P.hypervolume([[0.5, 0.5]], (1, 1)) == pytest.approx(0.25)
    assert P.hypervolume([[1.5, 0.1]], (1, 1)) == 0.0  # outside the reference box


def test_pareto_set_keeps_feasible_non_dominated_records():
    def rec(key, loss, ratio, failed=False):
        return {"key": key, "objective": loss, "budget_ratio": ratio, "failed": failed}
    recs = [rec("a", 1.0, 0.9), rec("b", 2.0, 0.5), rec("c", 2.5, 0.95), rec("d", 0.5, 1.2),
            rec("e", 0.1, 0.4, failed=True)]
    assert [r["key"] for r in P.pareto_set(recs)] == ["b", "a"]


# -- the space, repair and the operators ----------------------------------------------------------
def test_unprofiled_rungs_are_estimated_from_the_profiled_one():
    kl = P.kl_by_rung({"2": [1.0, 2.0]}, (2, 3, 4, 8, 16), 2)
    assert kl[0].tolist() == pytest.approx([1.0, 0.25, 0.0625, 1.0 / 4**6, 0.0])
    assert P.kl_by_rung({"2": [1.0], "4": [0.3]}, (2, 3, 4), 1)[0].tolist() == pytest.approx([1.0, 0.25, 0.3])
    with pytest.raises(QRError, match="rerun Phase I"):
        P.kl_by_rung({"2": [1.0]}, (2, 4), 3)


def test_repair_always_returns_a_feasible_allocation():
    space = _space()
    rng = np.random.default_rng(0)
    for _ in range(50):
        genes = rng.integers(0, space.upper + 1)
        fixed = P.repair(space, genes)
        assert space.bytes(fixed) <= space.budget
        assert (fixed <= genes).all()  # only downgrades
    feasible = np.zeros(space.upper.shape, dtype=int)
    assert (P.repair(space, feasible) == feasible).all()


def test_repair_downgrades_the_least_sensitive_blocks_first():
    space = _space(kl2=(10.0, 0.01, 0.01, 0.01))
    top = space.upper.copy()
    fixed = P.repair(space, top)
    assert fixed[0] > max(fixed[2], fixed[4], fixed[6])


def test_an_unreachable_budget_is_a_clear_error():
    with pytest.raises(QRError, match="over the budget.*raise budget_bits"):
        P.search_space(model_shapes(tiny_llama()), Q, (3, 4), RANKS, {"3": [1, 1, 1, 1]}, budget=1.0)


def test_crossover_inherits_whole_block_pairs_and_mutation_moves_one_rung():
    space = _space()
    problem = P.AllocationProblem(space, score=None)
    rng = np.random.default_rng(1)
    a, b = np.zeros(8, dtype=int), space.upper.copy()
    kids = P.BlockCrossover()._do(problem, np.stack([a[None], b[None]]), random_state=rng)
    for kid in kids[:, 0]:
        for blk in range(4):
            pair = tuple(kid[2 * blk:2 * blk + 2])
            assert pair in {tuple(a[2 * blk:2 * blk + 2]), tuple(b[2 * blk:2 * blk + 2])}
    x = np.array([[1, 1] * 4] * 20)
    y = P.NeighbourMutation(block_prob=0.5)._do(problem, x, random_state=rng)
    assert np.abs(y - x).max() == 1 and (y >= 0).all() and (y <= space.upper).all()
    assert (y != x).any()


def test_seeded_sampling_starts_from_the_phase_one_seed():
    space = _space()
    problem = P.AllocationProblem(space, score=None)
    seed = np.array([1, 1, 0, 0, 2, 1, 0, 0])
    pop = P.SeededSampling(seed, jitter=0.3, space=space)._do(problem, 6, random_state=np.random.default_rng(0))
    assert (pop[0] == P.repair(space, seed)).all()
    assert len({tuple(x) for x in pop}) == 6
    assert all(space.bytes(x) <= space.budget for x in pop)


# -- the proxy evaluator -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def base(smoke):
    from qr_lib.models import load_model
    return load_model(smoke.model, smoke.dtype, smoke.device)


def test_cache_hits_skip_training(smoke, base, tmp_path, monkeypatch):
    from qr_lib.allocation import uniform
    ev = fitness.ProxyEvaluator(smoke, tmp_path, *base, progress=False)
    alloc, fid = uniform(4, 4, 8), fitness.full_fidelity(smoke)
    first = ev.evaluate(alloc, fid)
    assert (tmp_path / f"{first['key']}.json").exists() and first["fidelity"] == "full"
    monkeypatch.setattr(fitness, "train", lambda *a, **k: pytest.fail("retrained a cached candidate"))
    again = fitness.ProxyEvaluator(smoke, tmp_path, *base, progress=False)
    assert again.evaluate(alloc, fid) == first and (again.hits, again.misses) == (1, 0)
    assert again.records("full") == [first] and again.records("low") == []


def test_a_task_accuracy_can_be_the_proxy_objective(smoke, base, tmp_path):
    from qr_lib.allocation import uniform
    p = load_profile("smoke", {"proxy_metric": "arc_easy", "proxy_metric_limit": 4})
    ev = fitness.ProxyEvaluator(p, tmp_path, *base, progress=False)
    rec = ev.evaluate(uniform(4, 4, 8), fitness.full_fidelity(p))
    assert rec["metric"] == "arc_easy" and rec["objective"] == pytest.approx(1 - rec["accuracy"])
    assert rec["val_loss"] > 0  # measured either way
    loss_key = fitness.ProxyEvaluator(smoke, tmp_path, *base, progress=False).key(uniform(4, 4, 8),
                                                                               fitness.full_fidelity(smoke))
    assert rec["key"] != loss_key  # the two objectives never share a cache entry


def test_a_diverged_candidate_scores_the_worst_loss(smoke, base, tmp_path, monkeypatch):
    from qr_lib.allocation import uniform
    monkeypatch.setattr(fitness, "train", lambda *a, **k: {"losses": [], "train_tokens": 10, "seconds": 0.0,
                                                           "diverged": True, "peak_memory": {}})
    rec = fitness.ProxyEvaluator(smoke, tmp_path, *base, progress=False).evaluate(uniform(4, 2, 4),
                                                                                  fitness.full_fidelity(smoke))
    assert rec["failed"] and rec["objective"] == fitness.FAILED_LOSS and rec["val_loss"] is None


# -- the whole search on the smoke profile ---------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(smoke, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    return out, search.run(smoke, out, *base, progress=False)


def test_search_writes_every_artifact_and_selects_a_feasible_allocation(smoke_run):
    from qr_lib.store import read_json
    out, result = smoke_run
    for name in ("sensitivity.json", "nsga.json", "bo.json", "search.json"):
        assert set(read_json(out / name)) == {"config", "environment", "result"}
    phase2 = read_json(out / "nsga.json")["result"]
    assert [g["generation"] for g in phase2["generations"]] == [1, 2]
    assert all(0 <= g["hv"] for g in phase2["generations"])
    assert {r["fidelity"] for r in phase2["evaluations"]} == {"low"}
    assert {r["fidelity"] for r in phase2["promoted"] + phase2["pareto"]} == {"full"}
    assert result["selected_scores"]["budget_ratio"] <= 1
    assert result["cost"]["epoch_equivalents"] > 0
    phase3 = read_json(out / "bo.json")["result"]
    for step in phase3["steps"]:
        if "candidate" in step:  # scored by a real proxy fine-tune, cached like every other
            assert (out / "evaluations" / f"{step['candidate']['key']}.json").exists()
            assert step["candidate"]["fidelity"] == "full" and step["candidate"]["train_tokens"] > 0


def test_the_search_is_deterministic(smoke, base, smoke_run, tmp_path):
    from qr_lib.store import read_json
    out, first = smoke_run
    again = search.run(smoke, tmp_path, *base, progress=False)
    assert again["selected"] == first["selected"]
    a, b = read_json(out / "nsga.json")["result"], read_json(tmp_path / "nsga.json")["result"]
    assert [r["key"] for r in a["evaluations"]] == [r["key"] for r in b["evaluations"]]
    assert [r["objective"] for r in a["pareto"]] == pytest.approx([r["objective"] for r in b["pareto"]])


def test_the_warm_start_uses_the_phase_one_profile(smoke, base, smoke_run):
    from qr_lib.store import read_json
    out, _ = smoke_run
    phase1 = read_json(out / "sensitivity.json")["result"]
    phase2 = read_json(out / "nsga.json")["result"]
    space = nsga.make_space(smoke, fitness.ProxyEvaluator(smoke, out / "evaluations", *base, progress=False), phase1)
    seed = nsga.seed_genes(smoke, phase1, space)
    assert phase2["seed_genes"] == seed.tolist()
    first = phase2["evaluations"][0]  # the first individual scored is the seed itself
    assert first["generation"] == 1 and space.genes(first).tolist() == seed.tolist()
    flipped = {"bits": phase1["bits"], "kl": {b: v[::-1] for b, v in phase1["kl"].items()}}
    assert nsga.seed_genes(smoke, flipped, space).tolist() != seed.tolist()


def test_the_explorer_reports_memory_predicted_kl_and_the_nearest_measured_scores(smoke, base, smoke_run):
    from qr_lib.explorer import Explorer
    out, result = smoke_run
    ex = Explorer(smoke, out, n_groups=2, base=base[0])
    sel = result["selected"]
    d = ex.describe(Allocation(sel["bits"], sel["ranks"], smoke.bit_ladder, smoke.rank_ladder))
    nearest = d["nearest"][0]
    assert nearest["distance"] == 0  # the search fine-tuned its own selection
    assert nearest["val_loss"] == pytest.approx(result["selected_scores"]["val_loss"])
    uniform4 = ex.describe(ex.allocation([4, 4], [8, 8]))
    assert uniform4["budget_ratio"] == pytest.approx(1.0)  # the budget is uniform 4-bit r8
    lower = ex.describe(ex.allocation([2, 2], [8, 8]))
    assert lower["predicted_kl"] > uniform4["predicted_kl"] and lower["memory_MiB"] < uniform4["memory_MiB"]


def test_fill_spends_the_budget_on_the_most_sensitive_blocks():
    space = _space(kl2=(10.0, 0.01, 0.01, 0.01))
    filled = P.fill(space, np.zeros(8, dtype=int))
    assert space.bytes(filled) <= space.budget
    room = space.budget - space.bytes(filled)
    assert all(m[2] > room for m in P._moves(space, filled, +1))  # no affordable upgrade is left
    assert filled[0] == space.upper[0]  # the fragile block is upgraded first, to the top rung


def test_a_killed_search_resumes_without_losing_finished_evaluations(smoke, base, tmp_path, monkeypatch):
    real = fitness.ProxyEvaluator.evaluate

    def dies_after_three(self, allocation, fidelity):
        if self.misses >= 3 and not self.path(allocation, fidelity).exists():
            raise KeyboardInterrupt("killed")
        return real(self, allocation, fidelity)

    monkeypatch.setattr(fitness.ProxyEvaluator, "evaluate", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        search.run(smoke, tmp_path, *base, progress=False)
    finished = sorted(p.name for p in (tmp_path / "evaluations").glob("*.json"))
    assert len(finished) == 3
    monkeypatch.setattr(fitness.ProxyEvaluator, "evaluate", real)
    ev = fitness.ProxyEvaluator(smoke, tmp_path / "evaluations", *base, progress=False)
    phase1 = search.sensitivity.run(smoke, tmp_path, *base, progress=False)
    nsga.search(smoke, ev, phase1)
    assert ev.hits >= 3
    assert set(finished) <= {p.name for p in (tmp_path / "evaluations").glob("*.json")}


def test_bo_utility_and_neighbours():
    front = [{"objective": 1.0, "budget_ratio": 1.0}, {"objective": 2.0, "budget_ratio": 0.5}]
    u = bo.utility(front, front, alpha=0.6)
    assert u.tolist() == pytest.approx([0.6 - 0.4, 0.0])
    space = _space()
    genes = P.repair(space, np.ones(8, dtype=int))
    near = bo.neighbours(space, genes)
    assert near and all(np.abs(g - genes).sum() == 1 and space.bytes(g) <= space.budget for g in near)
