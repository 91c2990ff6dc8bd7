"""The proxy check: its statistics on constructed scores, and a real run on the smoke profile."""
import numpy as np
import pandas as pd
import pytest

from qr_lib.errors import QRError
from qr_lib.workbook import proxy_check


def _scores(truth, noise_by_length, rng):
    rows = []
    for length, noise in noise_by_length.items():
        for seed in (0, 1):
            for m, t in truth.items():
                for n_val in (16, 64):
                    rows.append({"method": m, "seed": seed, "length": length, "n_val": n_val,
                                 "proxy_loss": t + rng.normal(0, noise * (2 if n_val == 16 else 1))})
    return pd.DataFrame(rows)


def test_longer_proxies_rank_better_and_the_cheapest_good_one_is_recommended():
    rng = np.random.default_rng(0)
    truth = {f"m{i}": 3.0 + 0.1 * i for i in range(10)}
    finals = pd.DataFrame({"method": list(truth), "final_dev_loss": list(truth.values())})
    table = proxy_check.summary(_scores(truth, {0: 1.0, 8: 0.02, 16: 0.005}, rng), finals, batch_size=4)
    by = table.set_index(["length", "n_val"])
    assert by.loc[(16, 64), "spearman"] > 0.95 and by.loc[(0, 64), "spearman"] < 0.8
    assert by.loc[(16, 64), "signal_to_noise"] > by.loc[(0, 64), "signal_to_noise"]
    rec = proxy_check.recommend(table, 0.8)
    assert rec["reaches"] and rec["length"] == 8                     # 16 steps also works, but costs more
    none = proxy_check.recommend(table.assign(spearman=table["spearman"] * 0.5), 0.8)
    assert not none["reaches"] and "no proxy setting reaches" in none["statement"]


def test_a_proxy_that_only_separates_far_allocations_is_caught_near_the_front():
    """Five far allocations (random draws) ranked right and five close ones ranked in reverse: the
    whole-set Spearman looks fine, the top-5 one says the proxy cannot make the search's decisions."""
    close, far = {f"c{i}": 3.0 + 0.1 * i for i in range(5)}, {f"f{i}": 8.0 + i for i in range(5)}
    truth = {**close, **far}
    proxy = {**{m: 3.4 - (t - 3.0) for m, t in close.items()}, **far}
    finals = pd.DataFrame({"method": list(truth), "final_dev_loss": list(truth.values())})
    scores = pd.DataFrame([{"method": m, "seed": s, "length": 16, "n_val": 64, "proxy_loss": v + 0.001 * s}
                           for m, v in proxy.items() for s in (0, 1)])
    row = proxy_check.summary(scores, finals, batch_size=4, top_k=5).iloc[0]
    assert row["spearman"] > 0.5 and row["top_k"] == 5
    assert row["spearman_top"] == pytest.approx(-1.0) and row["kendall_top"] == pytest.approx(-1.0)
    rec = proxy_check.recommend(pd.DataFrame([row]), 0.8)
    assert not rec["reaches"]                                            # so it is not recommended,
    assert "fails among the best 5" in rec["statement"] and "-1.00 among the best 5" in rec["statement"]  # and why


def _write_finals(root, rows, dev=True, seed=0):
    from qr_lib.algorithm.allocation import uniform
    from qr_lib.layout import Layout
    from qr_lib.store import write_artifact
    from qr_lib.workbook.finetune import RunResult
    for method, bits, loss in rows:
        result = RunResult(method=method, name=method, seed=seed, allocation=uniform(1, bits, 8, name=method),
                           memory_bytes=1, avg_bits=bits, trainable_parameters=0, train={}, adapter_notes={},
                           test_loss=loss + 100, test_examples={}, heldout_perplexity=0.0, benchmarks={}, seconds=0,
                           dev_loss=loss if dev else None)
        write_artifact(Layout(root).run(method, seed).result, {}, result.to_dict())
    return Layout(root)


def test_two_methods_with_one_allocation_count_once_and_the_dev_split_is_read_not_test(tmp_path):
    layout = _write_finals(tmp_path, (("hqq4", 4, 3.7), ("qr_adaptor", 4, 3.7), ("hqq3", 3, 5.3)))
    finals = proxy_check.final_losses(layout, ("hqq4", "qr_adaptor", "hqq3"))
    assert list(finals["method"]) == ["hqq4", "hqq3"] and finals.loc[0, "same_as"] == ["qr_adaptor"]
    assert list(finals["final_dev_loss"]) == [3.7, 5.3]          # the test losses are 100 higher


def test_final_runs_without_a_dev_score_are_refused(tmp_path):
    layout = _write_finals(tmp_path, (("hqq4", 4, 3.7),), dev=False)
    with pytest.raises(QRError, match="data.n_dev"):
        proxy_check.final_losses(layout, ("hqq4",))
    # Seeds outside finetune.dev_seeds score no dev split: the proxy check reads the seeds that did.
    _write_finals(tmp_path, (("hqq4", 4, 3.5),), dev=True, seed=1)
    finals = proxy_check.final_losses(layout, ("hqq4",))
    assert finals.loc[0, "final_dev_loss"] == 3.5 and finals.loc[0, "final_seeds"] == 1


def test_close_pairs_are_counted_against_the_proxy_noise():
    finals = pd.DataFrame({"method": ["a", "b", "c"], "final_dev_loss": [3.00, 3.01, 4.0]})
    scores = pd.DataFrame([{"method": m, "seed": s, "length": 4, "n_val": 8, "proxy_loss": v + 0.01 * s}
                           for m, v in (("a", 3.2), ("b", 3.1), ("c", 4.2)) for s in (0, 1)])
    row = proxy_check.summary(scores, finals, 4).iloc[0]
    # noise = 0.00707; a-b (0.01 apart) is close, and the proxy orders it the wrong way
    assert row["close_pairs"] == 1 and row["close_pairs_ordered_right"] == 0 and row["pairs"] == 3


@pytest.mark.integration
def test_proxy_check_on_smoke_scores_every_length_from_one_run(tmp_path):
    """Final runs for three allocations, then the study: every (length, n_val) has a row, and a
    checkpoint at L equals a separate proxy run of L steps (constant schedule)."""
    import dataclasses
    import json

    from qr_lib.algorithm.build import build
    from qr_lib.algorithm.memory import model_shapes
    from qr_lib.algorithm.train import example_losses, mean_loss, train
    from qr_lib.data import load_finetune
    from qr_lib.layout import Layout
    from qr_lib.models import load_model
    from qr_lib.workbook import finetune
    from qr_lib.workbook.methods import Context, load_method
    from qr_lib.workbook.profiles import load_profile

    p = load_profile("smoke", {"proxy_check.methods": ["hqq3", "hqq4", "lora16"], "proxy_check.lengths": [0, 2, 4],
                               "proxy_check.n_val": [8, 16], "finetune.max_steps": 2})
    base, tok = load_model(p.model, p.dtype, p.device)
    layout = Layout(tmp_path)
    for m in p.proxy_check.methods:
        finetune.run(p, layout, load_method(m), 0, base, tok, progress=False)
    result = proxy_check.run(p, layout, base, tok, progress=False)
    table = pd.DataFrame(result["table"])
    assert len(table) == 3 * 2 and table["allocations"].eq(3).all()
    assert result["recommendation"]["length"] in (0, 2, 4)
    runs = {r.method: r for r in finetune.results(layout)}
    assert {f["method"]: f["final_dev_loss"] for f in result["finals"]} == {m: runs[m].dev_loss for m in runs}
    again = proxy_check.run(p, layout, base, tok, progress=False)      # cached curves
    assert again["scores"] == result["scores"]
    curve = sorted(layout.proxy_check_curve("*").parent.glob("*.json"))[0]   # one number tampered
    record = json.loads(curve.read_text())
    record["result"]["curve"]["2"][0][0] = 0.0
    curve.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="damaged or was edited"):
        assert proxy_check.run(p, layout, base, tok, progress=False)["scores"] == result["scores"]

    alloc = load_method("hqq4").resolve(Context(p, model_shapes(base), layout))
    splits = load_finetune(p.data)
    model = build(base, alloc, p.quant, p.lora, progress=False, seed=0)
    train(model, tok, splits.train, dataclasses.replace(p.proxy, steps=2, seed=0), progress=False)
    separate = mean_loss(example_losses(model, tok, splits.val[:16], p.proxy.max_len))
    row = [s for s in result["scores"] if s["method"] == "hqq4" and s["seed"] == 0 and s["length"] == 2
           and s["n_val"] == 16][0]
    assert row["proxy_loss"] == pytest.approx(separate, rel=1e-5)
