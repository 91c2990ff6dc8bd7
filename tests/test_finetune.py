"""The final fine-tune, its baselines, saving/reloading, and the lm-eval tasks, on the tiny model."""

import dataclasses
import json

import pandas as pd
import pytest
import torch

from qr_lib.algorithm.adapters import loftq_init, merge_for_scoring, prepare
from qr_lib.algorithm.allocation import uniform
from qr_lib.algorithm.memory import model_shapes
from qr_lib.algorithm.train import eval_loss, train
from qr_lib.config import EvalConfig, FinetuneConfig, LoraSettings, QuantConfig, TrainConfig
from qr_lib.errors import QRError
from qr_lib.evaluate import headline, run_tasks
from qr_lib import REPO_DIR
from qr_lib.layout import Cache, Layout, RunDir
from qr_lib.workbook import comparison, finetune
from qr_lib.workbook.methods import Context, load_method, method_ids, run_variant_searches
from qr_lib.workbook.profiles import load_profile

Q = QuantConfig(group_size=64, hqq_optimize=False)


@pytest.fixture(scope="module")
def base():
    from qr_lib.models import load_model
    return load_model("tiny", "float32")


@pytest.fixture(scope="module")
def quick():
    """The smoke profile with one task, two documents: exercises the path, not the numbers."""
    return load_profile("smoke", {"eval.tasks": ["qr_arc_easy"], "eval.limit": 2, "finetune.max_steps": 3,
                                  "eval.seeds": [0], "finetune.seeds": [0, 1]})


def resolve(profile, method_id, base, folder):
    """A method's allocation, as a final run resolves it, with `folder` as the results layout."""
    return load_method(method_id).resolve(Context(profile, model_shapes(base[0]), Layout(folder)))


def test_train_config_covers_the_requested_epochs():
    cfg = FinetuneConfig(epochs=0.5, batch_size=4, grad_accum=2, warmup_ratio=0.1)
    t = cfg.train_config(2000, seed=3)
    assert t.steps == 125 and t.warmup_steps == 12 and t.seed == 3 and t.grad_accum == 2
    assert t.schedule == "linear"
    assert FinetuneConfig(max_steps=7).train_config(2000, 0).steps == 7


def test_every_method_file_loads_and_unknown_ones_are_refused():
    ids = method_ids()
    assert {"qr_adaptor", "lora16", "hqq4", "nf4", "hqq3", "hqq2", "adalora_nf4", "loftq_hqq4",
            "bits_only", "rank_only"} <= set(ids)
    for m in ids:
        assert load_method(m).name
    with pytest.raises(QRError, match="choose one of"):
        load_method("qlora_9bit")


def test_plan_repeats_only_multi_seed_methods_and_runs_every_random_draw_at_every_seed(quick):
    pairs = finetune.plan(quick, ["qr_adaptor", "hqq2", "random4_0", "random4_1"])
    assert [(m.id, s) for m, s in pairs] == [("qr_adaptor", 0), ("hqq2", 0), ("random4_0", 0), ("random4_1", 0),
                                             ("qr_adaptor", 1), ("random4_0", 1), ("random4_1", 1)]


def test_a_random_draw_spends_its_budget_and_is_reproducible(quick, base, tmp_path):
    from qr_lib.algorithm.memory import budget_bytes, formula_bytes, model_shapes
    shapes = model_shapes(base[0])
    budget = budget_bytes(shapes, quick.quant, 4, 8)
    draws = [resolve(quick, f"random4_{k}", base, tmp_path) for k in (0, 1)]
    assert draws[0].pairs() != draws[1].pairs()
    assert draws[0].pairs() == resolve(quick, "random4_0", base, tmp_path).pairs()
    for d in draws:
        used = formula_bytes(shapes, d, quick.quant)["blocks"]
        assert 0.8 * budget < used <= budget
    low = resolve(quick, "random3p5_0", base, tmp_path)
    three = budget_bytes(shapes, quick.quant, 3, 8)
    assert formula_bytes(shapes, low, quick.quant)["blocks"] <= (three + budget) / 2


def test_searched_method_without_a_search_is_a_clear_error(quick, base, tmp_path):
    with pytest.raises(QRError, match="run the search first"):
        resolve(quick, "qr_adaptor", base, tmp_path)


def test_a_run_is_saved_reloads_to_the_same_logits_and_is_not_redone(quick, base, tmp_path, monkeypatch):
    model_, tok = base
    rec = finetune.run(quick, Layout(tmp_path), load_method("hqq3"), 0, model_, tok, progress=False)
    where = Layout(tmp_path).run("hqq3", 0)
    stored = json.loads(where.result.read_text())
    assert set(stored) == {"config", "environment", "result", "checksum"}
    assert stored["result"] == rec.to_dict()
    r = stored["result"]
    assert r["train"]["steps"] == 3 and len(r["train"]["losses"]) == 3
    assert r["benchmarks"]["qr_arc_easy"]["n"] == 2 and r["avg_bits"] == 3
    kept = where.lm_eval                         # lm-eval's own results and samples, as it wrote them
    assert (kept / "results_qr_arc_easy.json").exists()
    recorded = (kept / "results_qr_arc_easy.json").read_text()   # lm-eval's paths, as any machine reads them
    assert str(REPO_DIR) not in recorded and str(Cache.here().root) not in recorded
    adapter_config = json.loads((where.adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == quick.model   # the profile's name, not a folder here
    assert len((kept / "samples_qr_arc_easy.jsonl").read_text().splitlines()) == 2
    assert r["train"]["peak_memory"]["peak_bytes"] > 0
    assert stored["environment"]["auto_dtype_cpu"] in ("float32", "bfloat16")  # which dtype auto would pick here
    assert (where.adapter / "adapter_model.safetensors").exists()
    # The test split, example by example: the unit of paired comparisons.
    test = finetune.run_data(quick).test
    assert len(r["test_examples"]["nll_sum"]) == len(r["test_examples"]["tokens"]) == len(test) == quick.data.n_test
    reloaded, _ = finetune.load_finetuned(where, model_, tok)
    assert r["test_loss"] == pytest.approx(eval_loss(reloaded, tok, test, quick.finetune.max_len), rel=1e-5)
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("redid a finished run"))
    assert finetune.run(quick, Layout(tmp_path), load_method("hqq3"), 0, model_, tok, progress=False) == rec


def test_the_recipe_is_a_full_epoch_and_benchmarks_only_the_listed_seeds(base, tmp_path):
    model_, tok = base
    profile = load_profile("smoke", {"eval.tasks": ["qr_arc_easy"], "eval.limit": 2, "eval.seeds": [0]})
    rec = finetune.run(profile, Layout(tmp_path), load_method("hqq4"), 1, model_, tok, progress=False)
    assert rec.train["epochs"] >= 1.0 and rec.train["steps"] == profile.data.n_train // 4
    assert rec.benchmarks == {}  # seed 1 is not benchmarked; its test loss is measured
    assert rec.test_loss > 0


def test_only_the_listed_methods_are_benchmarked_and_only_the_listed_seeds_score_dev(base, tmp_path):
    model_, tok = base
    profile = load_profile("smoke", {"eval.tasks": ["qr_arc_easy"], "eval.limit": 2, "eval.methods": ["lora16"],
                                     "finetune.dev_seeds": [0], "finetune.max_steps": 2})
    hqq4, lora16 = load_method("hqq4"), load_method("lora16")
    first = finetune.run(profile, Layout(tmp_path), hqq4, 0, model_, tok, progress=False)
    assert first.benchmarks == {} and first.dev_loss > 0 and len(first.dev_examples["tokens"]) == profile.data.n_dev
    assert finetune.run(profile, Layout(tmp_path), hqq4, 1, model_, tok, progress=False).dev_loss is None
    assert "qr_arc_easy" in finetune.run(profile, Layout(tmp_path), lora16, 0, model_, tok, progress=False).benchmarks


def test_save_and_reload_give_identical_logits_after_training(quick, base, tmp_path):
    model_, tok = base
    alloc = uniform(4, 4, 8)
    model, _, _ = prepare(model_, alloc, Q, LoraSettings(), "lora", seed=1)
    from qr_lib.data import Example
    ex = [Example(f"Q: {i}?\nA:", f" {i}", "toy") for i in range(8)]
    train(model, tok, ex, TrainConfig(steps=3, batch_size=4, lr=1e-2, max_len=16), progress=False)
    finetune.save_adapter(model, RunDir(tmp_path), alloc, Q, quick, load_method("hqq4"))
    reloaded, _ = finetune.load_finetuned(RunDir(tmp_path), model_, tok)
    x = torch.randint(0, len(tok), (2, 12))
    assert torch.allclose(model(input_ids=x).logits, reloaded(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("dense,adapter,qcfg", [(True, "lora", Q), (True, "adalora", QuantConfig(backend="bnb")),
                                                (False, "lora", Q)])
def test_a_trained_adapter_merged_for_scoring_scores_as_it_did_and_saves_as_it_was(quick, base, tmp_path, dense,
                                                                                  adapter, qcfg):
    model_, tok = base
    before = {k: v.clone() for k, v in model_.state_dict().items()}
    model, hook, _ = prepare(model_, uniform(4, 4, 8), dataclasses.replace(qcfg, dequantize_once=dense),
                             LoraSettings(), adapter, seed=1, total_steps=3)
    from qr_lib.data import Example
    from qr_lib.algorithm.train import example_losses
    ex = [Example(f"Q: {i}?\nA:", f" {i}", "toy") for i in range(8)]
    train(model, tok, ex, TrainConfig(steps=3, batch_size=4, lr=1e-2, max_len=16), progress=False, on_step=hook)
    unmerged = example_losses(model, tok, ex, 16)
    # merged only over dense weights: a packed quantized base would be requantized, losing what its bits keep
    assert merge_for_scoring(model) == dense
    merged = example_losses(model, tok, ex, 16)
    assert [c for _, c in merged] == [c for _, c in unmerged]
    assert [s for s, _ in merged] == pytest.approx([s for s, _ in unmerged], rel=1e-4, abs=1e-5)
    assert all(torch.equal(v, model_.state_dict()[k]) for k, v in before.items())   # the shared base untouched
    if adapter == "lora":            # the adapter saved after merging is the trained one
        finetune.save_adapter(model, RunDir(tmp_path), uniform(4, 4, 8), Q, quick, load_method("hqq4"))
        reloaded, _ = finetune.load_finetuned(RunDir(tmp_path), model_, tok)
        assert [s for s, _ in example_losses(reloaded, tok, ex, 16)] == pytest.approx([s for s, _ in unmerged],
                                                                                        rel=1e-4, abs=1e-5)


def test_loftq_starts_closer_to_the_unquantized_weights(base):
    model_, _ = base
    model, _, notes = prepare(model_, uniform(4, 2, 8), Q, LoraSettings(), "loftq")
    assert notes["residual_after"] < notes["residual_before"]
    again = loftq_init(model, model_)
    assert again["residual_after"] == pytest.approx(notes["residual_after"], rel=1e-4)


def test_adalora_needs_a_backend_it_supports(base):
    with pytest.raises(QRError, match="quant.backend = 'bnb'"):
        prepare(base[0], uniform(4, 4, 8), Q, LoraSettings(), "adalora", total_steps=10)


def test_adalora_trains_on_nf4(base):
    model, hook, _ = prepare(base[0], uniform(4, 4, 8), QuantConfig(backend="bnb"), LoraSettings(), "adalora",
                             total_steps=6)
    from qr_lib.data import Example
    ex = [Example(f"Q: {i}?\nA:", f" {i}", "toy") for i in range(8)]
    log = train(model, base[1], ex, TrainConfig(steps=6, batch_size=4, max_len=16), progress=False, on_step=hook)
    assert len(log["losses"]) == 6 and not log["diverged"]


def test_every_task_yaml_runs_offline(base):
    """Every qr_* task (the shared template through `include:`, the prompt in its YAML) scores offline."""
    model_, tok = base
    res = run_tasks(model_, tok, EvalConfig(limit=2, max_gen_toks=4), progress=False)
    assert set(res) == {f"qr_{t}" for t in ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq",
                                             "openbookqa", "mmlu", "gsm8k")}
    for task, m in res.items():
        value, stderr = headline(m)
        assert m["n"] == 2 and 0 <= value <= 1, task
        assert len(m["per_document"]["doc_id"]) == 2 and sum(m["per_document"]["value"]) / 2 == pytest.approx(value)
    assert "acc_norm" in res["qr_arc_easy"] and res["qr_gsm8k"]["metric_used"] == "exact_match,strict-match"


def test_comparison_table_averages_seeds(quick, base, tmp_path):
    model_, tok = base
    for seed in (0, 1):
        finetune.run(quick, Layout(tmp_path), load_method("hqq2"), seed, model_, tok, progress=False)
    per_seed = comparison.runs(Layout(tmp_path))
    table = comparison.summary(per_seed)
    assert len(per_seed) == 2 and table.loc[0, "seeds"] == 2
    assert table.loc[0, "test_loss"] == pytest.approx(per_seed["test_loss"].mean())
    text = comparison.formatted(table, ["qr_arc_easy"])
    assert "±" in text.loc[0, "test loss"]
    assert comparison.paper_reference()["entries"]


def test_a_rank_only_search_keeps_every_block_at_four_bits(quick, base, tmp_path):
    layout, method = Layout(tmp_path), load_method("rank_only")
    with pytest.raises(QRError, match="run the search first"):   # a final run never searches
        resolve(quick, "rank_only", base, tmp_path)
    run_variant_searches(quick, layout, [method], *base, progress=False)
    alloc = resolve(quick, "rank_only", base, tmp_path)
    assert set(alloc.bits) == {4} and alloc.name == "Rank-only search"
    assert layout.variant("rank_only").search.exists()
    assert layout.sensitivity.exists() and layout.variant("rank_only").sensitivity == layout.sensitivity


def test_a_new_search_selection_is_a_new_run(quick, base, tmp_path):
    from qr_lib.algorithm.search import SearchResult
    from qr_lib.store import write_artifact
    model_, tok = base
    layout, method = Layout(tmp_path), load_method("qr_adaptor")
    for alloc in (uniform(4, 4, 8), uniform(4, 3, 8)):
        write_artifact(layout.search, {}, SearchResult(alloc, {}, {}, {}).to_dict())
        runs = finetune.run(quick, layout, method, 0, model_, tok, progress=False)
        assert runs.allocation.pairs() == alloc.pairs()
    assert len(finetune.results(layout)) == 1 and finetune.results(layout)[0].allocation.bits == (3,) * 4


def test_peak_memory_per_method_and_its_ratio_to_qlora():
    per_seed = pd.DataFrame({"method": ["nf4", "nf4", "lora16", "qr"], "name": ["NF4", "NF4", "LoRA", "QR"],
                             "peak_GiB": [2.0, 2.2, 3.15, 1.89]})
    t = comparison.peak_memory(per_seed).set_index("method")
    assert t.loc["nf4", "peak GiB (mean)"] == pytest.approx(2.1) and t.loc["nf4", "runs"] == 2
    assert t.loc["lora16", "/ nf4"] == pytest.approx(1.5) and t.loc["qr", "/ nf4"] == pytest.approx(0.9)


def test_claims_are_paired_comparisons_with_known_answers(tmp_path):
    """Constructed runs: QR-Adaptor is 0.001 nats/token worse than LoRA-16 (equivalent within 0.01),
    0.05 better than HQQ 4-bit on every example (better), and each random draw, run at its own seed,
    is 0.2 worse (better than chance). Examples differ far more than methods: only pairing can tell."""
    import numpy as np

    from qr_lib.store import write_artifact
    from qr_lib.workbook.finetune import RunResult
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 12, size=300)
    difficulty = rng.gamma(2.0, 1.5, size=300)
    docs = {"doc_id": list(range(40)), "value": [float(v) for v in rng.integers(0, 2, size=40)]}

    def write(method, seed, shift, noise=0.002):
        per_token = difficulty + shift + rng.normal(0, noise, size=300)
        result = RunResult(method=method, name=method, seed=seed, allocation=uniform(4, 4, 8), memory_bytes=0,
                           avg_bits=4, trainable_parameters=0, train={}, adapter_notes={}, test_loss=0.0,
                           test_examples={"nll_sum": (per_token * tokens).tolist(), "tokens": tokens.tolist()},
                           heldout_perplexity=0.0, benchmarks={"qr_arc_easy": {"per_document": docs}}, seconds=0)
        write_artifact(Layout(tmp_path).run(method, seed).result, {}, result.to_dict())
    for seed in (0, 1, 2):
        write("qr_adaptor", seed, 0.0)
        write("lora16", seed, -0.001)
        write("hqq4", seed, 0.05)
        write(f"random4_{seed}", seed, 0.2)
    got = comparison.claims(finetune.results(Layout(tmp_path))).set_index(["claim", "metric"])
    loss = got.xs("test loss", level="metric")
    assert loss.loc["qr_adaptor matches 16-bit LoRA", "verdict"] == "equivalent"
    assert loss.loc["qr_adaptor beats uniform HQQ 4-bit r8", "verdict"] == "better"
    assert loss.loc["qr_adaptor beats uniform HQQ 4-bit r8", "a_minus_b"] == pytest.approx(-0.05, abs=1e-3)
    chance = loss.loc["qr_adaptor beats random allocations at the 4-bit budget"]
    assert chance["verdict"] == "better" and chance["b_methods"] == 3 and chance["seeds"] == 3
    assert loss["holds"].all()
    # Each verdict names its family: the declared primary claims (Holm across them), the rest exploratory.
    assert loss.loc["qr_adaptor matches 16-bit LoRA", "family"] == "primary"
    assert chance["family"] == "exploratory" and pd.isna(chance["p_holm"])
    assert (got.xs("benchmark average", level="metric")["family"] == "benchmarks").all()
    same_docs = got.xs("benchmark average", level="metric")   # identical answers everywhere
    assert (same_docs["a_minus_b"] == 0).all() and (same_docs["verdict"] == "equivalent").all()
    assert not any("nf4" in c or "3.5" in c for c in got.index.get_level_values("claim"))  # not run: left out


def test_one_method_runs_alone_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    from qr_lib import cli
    assert cli.main(["finetune", "--profile", "smoke", "--method", "hqq2"]) == 0
    assert (tmp_path / "smoke" / "runs" / "hqq2" / "seed0" / "result.json").exists()
    assert "QLoRA HQQ 2-bit seed 0: test loss" in capsys.readouterr().out


def test_the_memory_plot_zooms_on_the_methods_near_the_budget_error_bars_included():
    import matplotlib
    matplotlib.use("Agg")
    from qr_lib.workbook.plots import metric_vs_memory
    table = pd.DataFrame({"method": ["lora16", "hqq4", "qr_adaptor", "random4_0"], "name": ["LoRA-16", "4-bit", "QR", "r"],
                          "memory_MiB": [210.0, 63.0, 62.0, 38.0],
                          "test_loss": [3.2, 3.4, 3.5, 7.6], "test_loss_std": [0.01, float("nan"), 0.2, float("nan")],
                          "seeds": [3, 1, 3, 1]})
    fig = metric_vs_memory(table, "test_loss", "loss", budget_mib=63.0)
    full, zoom = fig.axes
    assert zoom.get_xlim()[0] > 50 and zoom.get_ylim()[0] < 3.4 and zoom.get_ylim()[1] > 3.7
    labels = full.get_legend_handles_labels()[1]
    assert "QR" in labels and "random allocations" in labels and "budget" in labels
    assert len(metric_vs_memory(table, "test_loss", "loss").axes) == 1  # no budget, nothing to zoom on


def test_a_run_two_methods_share_is_drawn_once_under_both_names_and_only_that():
    from qr_lib.workbook.plots import _merged
    table = pd.DataFrame({"method": ["hqq4", "qr_adaptor", "nf4"], "name": ["4-bit", "QR", "NF4"],
                          "memory_MiB": [63.0, 63.0, 63.0], "test_loss": [3.4, 3.4, 3.4],
                          "same_run_as": ["", "hqq4", ""]})
    drawn = _merged(table)
    assert list(drawn["method"]) == ["qr_adaptor", "nf4"]        # QR-Adaptor keeps its star
    assert list(drawn["name"]) == ["QR = 4-bit", "NF4"]           # equal numbers alone merge nothing


def test_every_method_keeps_one_colour_and_the_figures_say_what_made_them():
    from qr_lib.workbook import plots
    from qr_lib.workbook.profiles import load_profile
    assert plots.style("qr_adaptor") != plots.style("hqq4")
    assert plots.style("random4_0") == plots.style("random3p5_2")       # one baseline, one look
    assert "SmolLM2-135M" in plots.figure_caption(load_profile("default"))
    assert "profile smoke" in plots.figure_caption(load_profile("smoke")) and "mechanics, not the paper" in \
        plots.figure_caption(load_profile("smoke"))
    assert "random weights" not in plots.figure_caption(load_profile("default"))


def test_a_broken_method_file_names_itself_and_the_schema(tmp_path, quick, base):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",\n "allocation": {"bits": 4 "rank": 8}}')
    with pytest.raises(QRError, match="bad.json is not valid JSON \\(line 2"):
        load_method(str(bad))
    lists = tmp_path / "lists.json"
    lists.write_text('{"name": "x", "allocation": {"bits": [4, 4, 4, 4], "rank": 8}}')
    with pytest.raises(QRError, match="per-block choices are what the search selects"):   # refused at load
        load_method(str(lists))


def test_a_run_stopped_during_lm_eval_resumes_at_lm_eval_without_retraining(quick, base, tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C while lm-eval scores a run: the trained adapter and the scores before lm-eval
    are kept (trained.json, checksummed), and the rerun rebuilds the model from them and runs lm-eval
    alone, to the result an uninterrupted run writes."""
    model_, tok = base
    method = load_method("hqq4")
    clean = finetune.run(quick, Layout(tmp_path / "clean"), method, 0, model_, tok, progress=False)
    layout = Layout(tmp_path / "stopped")
    real = finetune.run_tasks

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "run_tasks", stopped)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(quick, layout, method, 0, model_, tok, progress=False)
    where = layout.run("hqq4", 0)
    assert where.trained.exists() and not where.result.exists()
    monkeypatch.setattr(finetune, "run_tasks", real)
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("retrained a run whose adapter was kept"))
    again = finetune.run(quick, layout, method, 0, model_, tok, progress=False)
    assert not where.trained.exists()
    assert again.benchmarks == clean.benchmarks and again.test_examples == clean.test_examples
    assert again.train["losses"] == clean.train["losses"]


def test_a_run_killed_before_its_result_is_redone_never_read_half_written(quick, base, tmp_path):
    """kill -9 between the adapter and result.json leaves a half-written adapter and no result: the
    rerun trains again, writes both, and reloads to the same logits as a clean run."""
    model_, tok = base
    layout, method = Layout(tmp_path), load_method("hqq4")
    first = finetune.run(quick, layout, method, 0, model_, tok, progress=False)
    where = layout.run("hqq4", 0)
    where.result.unlink()
    weights = where.adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])              # what a kill mid-write leaves
    again = finetune.run(quick, layout, method, 0, model_, tok, progress=False)
    assert again.test_loss == pytest.approx(first.test_loss)
    reloaded, _ = finetune.load_finetuned(where, model_, tok)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()


def test_two_methods_with_one_allocation_are_trained_once_and_reported_under_both_names(quick, base, tmp_path,
                                                                                      monkeypatch):
    """A search that selects uniform 4-bit r8 makes `qr_adaptor` the `hqq4` run again: same allocation,
    quantizer, adapter, seed and data, so the second is read from the first, not trained."""
    from qr_lib.algorithm.search import SearchResult
    from qr_lib.store import write_artifact
    model_, tok = base
    layout = Layout(tmp_path)
    write_artifact(layout.search, {}, SearchResult(uniform(4, 4, 8), {}, {}, {}).to_dict())
    first = finetune.run(quick, layout, load_method("hqq4"), 0, model_, tok, progress=False)
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trained the same allocation twice"))
    twin = finetune.run(quick, layout, load_method("qr_adaptor"), 0, model_, tok, progress=False)
    assert twin.same_run_as == "hqq4" and twin.method == "qr_adaptor" and twin.name == "QR-Adaptor (4-bit budget)"
    assert twin.test_loss == first.test_loss and twin.training_key == first.training_key
    with pytest.raises(QRError, match="same run as"):
        finetune.load_finetuned(layout.run("qr_adaptor", 0), model_, tok)
    monkeypatch.undo()
    nf4 = finetune.run(quick, layout, load_method("nf4"), 0, model_, tok, progress=False)   # another quantizer
    assert nf4.same_run_as is None and nf4.training_key != first.training_key


def test_a_batch_that_needs_a_missing_artifact_fails_before_its_first_run(quick, base, tmp_path):
    with pytest.raises(QRError, match="needs Phase I first"):
        finetune.run_all(quick, Layout(tmp_path), *base, methods=["hqq4", "phase1_knapsack4"], progress=False)
    assert not Layout(tmp_path).runs()                   # hqq4 did not train first


def test_a_truncated_adapter_is_retrained_and_never_exported_or_loaded(smoke, base, tmp_path, request):
    """The adapter's checksum is recorded beside the run (allocation.json): an adapter cut short makes
    the run retrain on the next read-back (same result, the file whole again), and export and load
    refuse it, naming the file, until then. The adapter and the export follow the umask (safetensors
    alone makes them 0600)."""
    import os
    request.addfinalizer(lambda old=os.umask(0o022): os.umask(old))
    from qr_lib.errors import QRError
    from qr_lib.layout import Layout
    from qr_lib.workbook import finetune
    from qr_lib.workbook.export import export_run
    from qr_lib.workbook.methods import load_method
    profile = dataclasses.replace(smoke, eval=dataclasses.replace(smoke.eval, tasks=()))
    layout = Layout(tmp_path)
    first = finetune.run(profile, layout, load_method("lora16"), 0, *base, progress=False)
    where = layout.run("lora16", 0)
    adapter = where.adapter / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    adapter.write_bytes(whole[: len(whole) // 3])
    for use in (lambda: export_run(where, *base), lambda: finetune.load_finetuned(where, *base)):
        with pytest.raises(QRError, match="does not match the checksum its run recorded"):
            use()
    with pytest.warns(UserWarning, match="retraining the run"):
        again = finetune.run(profile, layout, load_method("lora16"), 0, *base, progress=False)
    assert again.test_loss == pytest.approx(first.test_loss, abs=1e-6) and adapter.read_bytes() == whole
    out = export_run(where, *base)
    files = [p for folder in (where.adapter, out) for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
