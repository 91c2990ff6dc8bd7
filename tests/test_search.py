"""Phases II and III on the smoke profile (tiny in-process model), and their operators on toy spaces."""
import numpy as np
import pytest

from qr_lib.algorithm import proxy, search
from qr_lib.algorithm.memory import model_shapes
from qr_lib.algorithm.phases import PhaseI
from qr_lib.algorithm.search import bo, nsga
from qr_lib.algorithm.search import problem as P
from qr_lib.config import QuantConfig
from qr_lib.errors import QRError
from qr_lib.layout import Layout
from qr_lib.models import tiny_llama
from qr_lib.store import read_artifact
from qr_lib.workbook.profiles import load_profile

Q = QuantConfig(group_size=64, hqq_optimize=False)
BITS, RANKS = (2, 3, 4, 8), (4, 8, 16)


def _space(kl2=(0.5, 0.1, 0.2, 0.05), budget_bits=4, budget_rank=8):
    from qr_lib.algorithm.memory import budget_bytes
    shapes = model_shapes(tiny_llama())
    return P.search_space(shapes, Q, BITS, RANKS, {"2": list(kl2)}, budget_bytes(shapes, Q, budget_bits, budget_rank))


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


def test_the_knapsack_finds_the_least_kl_allocation_that_fits():
    """Brute force over every bit assignment at rank 8 of the 4-block tiny model."""
    import itertools
    space = _space(kl2=(3.0, 0.1, 0.9, 0.02))
    floor = space.bytes(P.uniform_genes(space, 0, 1))
    for budget in (space.budget, (space.budget + floor) / 2, floor + 1, floor):
        best = min((sum(space.kl[i, j] for i, j in enumerate(js)), js)
                   for js in itertools.product(range(len(BITS)), repeat=4)
                   if space.bytes(np.ravel([[j, 1] for j in js])) <= budget)
        got = P.knapsack(space, budget, rank_rung=1)
        assert space.bytes(got) <= budget and (got[1::2] == 1).all()
        assert space.kl[np.arange(4), got[0::2]].sum() == pytest.approx(best[0])
    assert P.knapsack(space, space.budget, 1)[0] >= P.knapsack(space, space.budget, 1)[6]  # fragile block 0 keeps more


def test_a_random_allocation_spends_its_budget():
    space = _space()
    rng = np.random.default_rng(0)
    for level in (space.budget, 0.7 * space.budget):
        for _ in range(10):
            g = P.random_allocation(space, level, rng)
            assert space.bytes(g) <= level
            ups = [g + np.eye(8, dtype=int)[i] for i in np.flatnonzero(g < space.upper)]
            assert all(space.bytes(u) > level for u in ups)  # maximal: no one-rung upgrade still fits


def test_the_first_generation_covers_the_memory_range():
    space = _space()
    members = P.initial_population(space, rank_rung=1, n_random=3, rng=np.random.default_rng(0))
    labels = [label for label, _ in members]
    genes = {tuple(g) for _, g in members}
    assert len(genes) == len(members)                                  # distinct
    assert tuple(P.uniform_genes(space, 2, 1)) in genes                # uniform 4-bit r8, the budget itself
    assert tuple(P.uniform_genes(space, 1, 1)) in genes                # uniform 3-bit r8
    assert "Phase I knapsack r4 at the budget" in labels
    assert sum(label.startswith("random") for label in labels) == 3
    ratios = sorted(space.bytes(g) / space.budget for _, g in members)
    assert all(r <= 1 for r in ratios)
    assert ratios[0] <= space.bytes(P.uniform_genes(space, 0, 1)) / space.budget + 1e-9  # down to uniform 2-bit
    levels = P.memory_levels(space, 1)
    assert levels[-1] == pytest.approx(space.budget) and len(levels) == 5   # 2, 2.5, 3, 3.5, 4 bits


def test_promotions_spread_over_the_front():
    assert nsga.spread(list("abcde"), 2) == ["a", "e"]
    assert nsga.spread(list("abcde"), 3) == ["a", "c", "e"]
    assert nsga.spread(list("ab"), 3) == ["a", "b"]
    assert nsga.spread(list("abc"), 1) == ["c"]


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


# -- the proxy evaluator -------------------------------------------------------------------------
def test_cache_hits_skip_training(smoke, base, tmp_path, monkeypatch):
    from qr_lib.algorithm.allocation import uniform
    ev = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False)
    alloc, level = uniform(4, 4, 8), proxy.full_level(smoke)
    first = ev.evaluate(alloc, level)
    assert Layout(tmp_path).evaluation(first.key).exists() and first.level == "full"
    monkeypatch.setattr(proxy, "train", lambda *a, **k: pytest.fail("retrained a cached candidate"))
    again = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False)
    assert again.evaluate(alloc, level) == first and (again.hits, again.misses) == (1, 0)
    assert again.records("full") == [first] and again.records("low") == []


def test_a_task_accuracy_can_be_the_proxy_objective(smoke, base, tmp_path):
    from qr_lib.algorithm.allocation import uniform
    p = load_profile("smoke", {"proxy_metric": "qr_arc_easy", "proxy_metric_limit": 4})
    ev = proxy.ProxyEvaluator(p, Layout(tmp_path), *base, progress=False)
    rec = ev.evaluate(uniform(4, 4, 8), proxy.full_level(p))
    assert rec.metric == "qr_arc_easy" and rec.objective == pytest.approx(1 - rec.accuracy)
    assert rec.val_loss > 0  # measured either way
    loss_key = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False).key(uniform(4, 4, 8),
                                                                                     proxy.full_level(smoke))
    assert rec.key != loss_key  # the two objectives never share a cache entry


def test_a_diverged_candidate_scores_the_worst_loss(smoke, base, tmp_path, monkeypatch):
    from qr_lib.algorithm.allocation import uniform
    monkeypatch.setattr(proxy, "train", lambda *a, **k: {"losses": [], "train_tokens": 10, "seconds": 0.0,
                                                         "diverged": True, "peak_memory": {}})
    rec = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False).evaluate(uniform(4, 2, 4),
                                                                                        proxy.full_level(smoke))
    assert rec.failed and rec.objective == proxy.FAILED_LOSS and rec.val_loss is None


# -- the whole search on the smoke profile (smoke_run: conftest.py) ---------------------------------
def test_search_writes_every_artifact_and_selects_a_feasible_allocation(smoke_run):
    layout, result = smoke_run
    for path in (layout.sensitivity, layout.nsga, layout.bo, layout.search):
        assert set(read_artifact(path)) == {"config", "environment", "result", "checksum"}
    phase2 = read_artifact(layout.nsga)["result"]
    assert [g["generation"] for g in phase2["generations"]] == [1, 2]
    assert all(0 <= g["hv"] for g in phase2["generations"])
    assert {r["level"] for r in phase2["evaluations"]} == {"low"}
    assert {r["level"] for r in phase2["promoted"] + phase2["pareto"]} == {"full"}
    assert result.selected_scores["budget_ratio"] <= 1
    assert result.cost["epoch_equivalents"] > 0
    assert search.load_result(layout) == result
    # The phases it carries are the artifacts' results, typed: their JSON form is the file's, field for field.
    assert search.load_result(layout).phases == result.phases
    for path, record in ((layout.sensitivity, result.phases.sensitivity), (layout.nsga, result.phases.nsga),
                         (layout.bo, result.phases.bo)):
        assert record.to_dict() == read_artifact(path)["result"]
    phase3 = read_artifact(layout.bo)["result"]
    for step in phase3["steps"]:
        if "candidate" in step:  # scored by a real proxy fine-tune, cached like every other
            assert layout.evaluation(step["candidate"]["key"]).exists()
            assert step["candidate"]["level"] == "full" and step["candidate"]["train_tokens"] > 0


def test_the_first_generation_is_scored_whole_uniform_points_at_full_level_and_promotions_distinct(smoke, base, smoke_run):
    layout, _ = smoke_run
    phase1 = PhaseI.from_dict(read_artifact(layout.sensitivity)["result"])
    phase2 = read_artifact(layout.nsga)["result"]
    space = P.space_for(smoke, model_shapes(base[0]), phase1)
    first = nsga.first_generation(smoke, space)
    assert [m["origin"] for m in phase2["first_generation"]] == [label for label, _ in first]
    scored = {r["key"] for r in phase2["evaluations"] if r["generation"] == 1}
    assert {m["key"] for m in phase2["first_generation"]} == scored       # all of it, before any offspring
    assert any(m["origin"] == "uniform 4-bit r8" for m in phase2["first_generation"])
    keys = [r["key"] for r in phase2["promoted"]]
    assert len(keys) == len(set(keys))                                    # never promoted twice
    # The uniform allocations at the budget's rank are scored at the full level whatever the low one says.
    full = {(tuple(r["bits"]), tuple(r["ranks"])) for r in phase2["promoted"]}
    n = space.n_blocks
    assert {((b,) * n, (8,) * n) for b in (2, 3, 4)} <= full
    assert [a["origin"] for a in phase2["anchors"]] == ["uniform 2-bit r8", "uniform 3-bit r8", "uniform 4-bit r8"]
    assert {a["key"] for a in phase2["anchors"]} <= set(keys)
    assert phase2["level_agreement"]["allocations"] == len(keys)    # each was scored at the low level first


def test_level_agreement_pairs_the_two_scores_of_one_allocation():
    low = [{"bits": [2], "ranks": [8], "objective": o, "failed": False} for o in (1.0,)] + \
          [{"bits": [b], "ranks": [8], "objective": o, "failed": False} for b, o in ((3, 2.0), (4, 3.0))]
    full = [{"bits": [b], "ranks": [8], "objective": o, "failed": False} for b, o in ((4, 0.1), (3, 0.2), (2, 0.3))]
    agree = nsga.level_agreement(low, full)
    assert agree["allocations"] == 3 and agree["spearman"] == pytest.approx(-1.0)


def test_the_phase1_knapsack_method_is_phase1s_choice_at_its_rank(smoke, base, smoke_run):
    from qr_lib.algorithm.search.problem import knapsack
    from qr_lib.workbook.methods import Context, load_method
    layout, _ = smoke_run
    space = P.space_for(smoke, model_shapes(base[0]), PhaseI.from_dict(read_artifact(layout.sensitivity)["result"]))
    alloc = load_method("phase1_knapsack4").resolve(Context(smoke, model_shapes(base[0]), layout))
    assert alloc.pairs() == space.allocation(knapsack(space, space.budget, space.rank_ladder.index(4))).pairs()
    assert set(alloc.ranks) == {4} and space.bytes(space.genes(alloc.to_dict())) <= space.budget


def test_the_explorer_reports_memory_predicted_kl_and_the_nearest_measured_scores(smoke, base, smoke_run):
    from qr_lib.workbook.explorer import Explorer
    layout, result = smoke_run
    ex = Explorer(smoke, layout, n_groups=2, base=base[0])
    d = ex.describe(result.selected)
    nearest = d["nearest"][0]
    assert nearest["distance"] == 0  # the search fine-tuned its own selection
    assert nearest["val_loss"] == pytest.approx(result.selected_scores["val_loss"])
    uniform4 = ex.describe(ex.allocation([4, 4], [8, 8]))
    assert uniform4["budget_ratio"] == pytest.approx(1.0)  # the budget is uniform 4-bit r8
    lower = ex.describe(ex.allocation([2, 2], [8, 8]))
    assert lower["predicted_kl"] > uniform4["predicted_kl"] and lower["memory_MiB"] < uniform4["memory_MiB"]


def test_the_explorer_predicts_from_learning_curves_so_rank_counts_and_flags_far_neighbours(smoke, base, smoke_run):
    """Without learning curves there is no curve prediction; with them (set here as the sizing stage would
    measure them at the final length), a uniform setting gets its measured gap back, an unmeasured rank is
    interpolated in log2(rank) and said so, bits without a curve are scaled by Phase I's KL, and a
    neighbour more than `far` rungs away is flagged."""
    from qr_lib.workbook.explorer import Explorer
    layout, result = smoke_run
    ex = Explorer(smoke, layout, n_groups=2, base=base[0])
    assert ex.reference is None and ex.describe(result.selected)["from_curves"] is None
    ex.reference, ex.gaps = 3.0, {(4, 4): 0.4, (4, 16): 0.1, (3, 8): 1.0}
    assert ex.predict(ex.allocation([4, 4], [4, 4]))["gap"] == pytest.approx(0.4)
    mid = ex.predict(ex.allocation([4, 4], [8, 8]))
    assert mid["gap"] == pytest.approx(0.25) and mid["dev_loss"] == pytest.approx(3.25)
    assert any("interpolated between ranks 4 and 16" in n for n in mid["notes"])
    two = ex.predict(ex.allocation([2, 2], [8, 8]))
    assert two["gap"] > 1.0 and any("2 bits has no curve" in n for n in two["notes"])
    ex.far = -1
    assert all(n["far"] for n in ex.describe(result.selected)["nearest"])


def test_run_headless_the_explorer_prints_the_budgets_reading_and_draws_no_widget(smoke, base, smoke_run, capsys,
                                                                                  monkeypatch):
    from qr_lib.progress import PLAIN_ENV
    from qr_lib.workbook import explorer as E
    shown = []
    monkeypatch.setattr(E, "show", shown.append)
    monkeypatch.setenv(PLAIN_ENV, "1")
    ex = E.Explorer(smoke, smoke_run[0], n_groups=2, base=base[0])
    assert ex.widget() is None
    text = capsys.readouterr().out
    assert "memory" in text and "x budget (fits)" in text and "nearest allocations" in text and len(shown) == 1


def test_the_explorer_says_when_the_results_it_finds_were_made_with_other_settings(smoke, base, smoke_run, tmp_path):
    """A profile whose proxy differs from the one that made the records finds none of them, and says
    which settings the results record (as on a CPU where "auto" means bf16 and the results are float32)."""
    import dataclasses
    import shutil

    from qr_lib.layout import Layout
    from qr_lib.store import write_artifact
    from qr_lib.workbook.explorer import Explorer
    layout = Layout(tmp_path / "copy")
    shutil.copytree(smoke_run[0].root, layout.root)
    write_artifact(layout.setup, {"profile": smoke}, {})
    assert "other settings" not in Explorer(smoke, layout, n_groups=2, base=base[0]).summary()
    other = dataclasses.replace(smoke, dtype="bfloat16")
    ex = Explorer(other, layout, n_groups=2, base=base[0])
    assert ex.records == [] and "dtype: 'float32' there, 'bfloat16' here" in ex.summary()


def test_the_selection_is_never_dominated():
    """The audit's case: a one-point front made every utility 0 and the first record, dominated, won."""
    recs = [{"key": "dominated", "objective": 3.0, "budget_ratio": 0.99},
            {"key": "better", "objective": 2.9, "budget_ratio": 0.95},
            {"key": "over", "objective": 1.0, "budget_ratio": 1.2},
            {"key": "small", "objective": 3.5, "budget_ratio": 0.7}]
    assert bo.select(recs)["key"] == "better"
    assert bo.select(recs, max_ratio=0.8)["key"] == "small"
    assert bo.select(recs, max_ratio=0.5) is None
    chosen = bo.select(recs)
    assert not any(r["objective"] <= chosen["objective"] and r["budget_ratio"] <= chosen["budget_ratio"]
                   and r is not chosen for r in recs)


def test_an_uninformative_gp_is_reported():
    stuck = {"length_scale": 0.05, "at_bound": True}
    assert bo.diagnosis([{"max_ei": 5e-5, "gp": stuck}], 1e-4)[0] is False
    informative, why = bo.diagnosis([{"max_ei": 0.01, "gp": stuck}, {"max_ei": 0.01, "gp": stuck}], 1e-4)
    assert not informative and "bound" in why
    assert bo.diagnosis([{"max_ei": 0.01, "gp": {"length_scale": 0.7, "at_bound": False}}], 1e-4)[0]


def test_bo_utility_and_neighbours():
    front = [{"objective": 1.0, "budget_ratio": 1.0}, {"objective": 2.0, "budget_ratio": 0.5}]
    u = bo.utility(front, front, alpha=0.6)
    assert u.tolist() == pytest.approx([0.6 - 0.4, 0.0])
    space = _space()
    genes = P.repair(space, np.ones(8, dtype=int))
    near = bo.neighbours(space, genes)
    assert near and all(np.abs(g - genes).sum() == 1 and space.bytes(g) <= space.budget for g in near)


def test_a_candidate_that_diverges_is_recorded_and_the_search_goes_on(smoke, base, tmp_path, monkeypatch):
    real, calls = proxy.train, []

    def second_diverges(*args, **kwargs):
        calls.append(1)
        log = real(*args, **kwargs)
        return {**log, "diverged": True} if len(calls) == 2 else log

    monkeypatch.setattr(proxy, "train", second_diverges)
    small = load_profile("smoke", {"nsga.generations": 1, "nsga.n_random": 0, "bo.iterations": 1, "select_at": [],
                                   "finetune.methods": ["qr_adaptor"], "proxy_check.methods": ["qr_adaptor"]})
    result = search.run(small, Layout(tmp_path), *base, progress=False)
    records = read_artifact(Layout(tmp_path).nsga)["result"]["evaluations"]
    assert sum(r["failed"] for r in records) == 1 and len(records) > 2
    assert result.selected_scores["objective"] < proxy.FAILED_LOSS


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_or_edited_evaluation_is_recomputed_not_used(smoke, base, tmp_path, damage):
    import json

    from qr_lib.algorithm.allocation import uniform
    ev = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False)
    alloc, level = uniform(4, 4, 8), proxy.full_level(smoke)
    first = ev.evaluate(alloc, level)
    path = Layout(tmp_path).evaluation(ev.key(alloc, level))
    if damage == "truncate":
        path.write_text(path.read_text()[:200])
    else:                                                   # valid JSON, a better score written by hand
        rec = json.loads(path.read_text())
        rec["result"]["objective"] = 0.001
        path.write_text(json.dumps(rec))
    again = proxy.ProxyEvaluator(smoke, Layout(tmp_path), *base, progress=False)
    with pytest.warns(UserWarning, match="damaged or was edited"):
        rec = again.evaluate(alloc, level)
    assert again.misses == 1 and rec.objective == pytest.approx(first.objective)


@pytest.mark.integration
def test_the_command_line_search_runs_on_two_dask_workers_when_asked(smoke_run, tmp_path, monkeypatch):
    """`qr-adaptor search --set parallel.backend=dask`: the notebooks open the runner, two worker
    processes write the proxy records, and the Pareto set is the serial run's."""
    pytest.importorskip("dask.distributed")
    import json
    import os

    from qr_lib import cli
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(["search", "--profile", "smoke", "--set", "parallel.backend=dask",
                     "--set", "parallel.workers=2"]) == 0
    layout = Layout(tmp_path / "smoke")
    first = {r["key"] for r in read_artifact(layout.nsga)["result"]["evaluations"] if r["generation"] == 1}
    writers = {json.loads(layout.evaluation(k).read_text())["environment"]["process"] for k in first}
    assert len(writers) == 2 and os.getpid() not in writers          # the first generation, on both workers
    serial = [r["key"] for r in read_artifact(smoke_run[0].nsga)["result"]["pareto"]]
    assert [r["key"] for r in read_artifact(layout.nsga)["result"]["pareto"]] == serial


def test_front_origins_and_phase3_gain_account_for_every_point(smoke_run):
    from qr_lib.algorithm import search
    _, result = smoke_run
    p2, p3 = result.phases.nsga, result.phases.bo
    rows = search.front_origins(p2, p3)
    assert sum(r["on_final_front"] for r in rows) == len(p3.pareto)
    scored = {(tuple(r["bits"]), tuple(r["ranks"])) for r in p2.evaluations + p2.promoted + p3.candidates()}
    assert sum(r["scored"] for r in rows) == len(scored)
    assert any(r["origin"].startswith("generation 1 (uniform") for r in rows)
    gain = search.phase3_gain(p2, p3)
    assert gain["phase3_best"] == p3.selected["objective"]
    assert gain["gain"] <= 1e-12                       # Phase III keeps Phase II's best, or finds better


def test_a_phase_record_of_another_shape_is_refused_with_what_to_do():
    good = {"bits": [2, 4], "kl": {"2": [0.5], "4": [0.1]}, "seconds": 1.0, "n_texts": 4}
    assert PhaseI.from_dict(good).n_blocks == 1 and PhaseI.from_dict(good).to_dict() == good
    for bad in ({k: v for k, v in good.items() if k != "n_texts"}, {**good, "extra": 1}):
        with pytest.raises(QRError, match="written by another version of qr_lib; delete it and rerun the search"):
            PhaseI.from_dict(bad)
