"""The sizing curves: scored on the dev split only, read back when unchanged, and the length and ladder
read from them."""
import dataclasses

import numpy as np
import pytest

from qr_lib.data import load_finetune
from qr_lib.errors import QRError
from qr_lib.layout import Layout
from qr_lib.workbook import sizing
from qr_lib.workbook.methods import load_method


def _curve(method, losses_by_step, n=64, noise=0.3, seed=0):
    """A synthetic curve: per-example NLL around the given mean loss per token (4 tokens each), the
    same example noise for every method (so differences are paired)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, noise, n)
    return {"method": method, "name": method, "avg_bits": 4.0, "memory_MiB": 1.0, "perplexity_before": 10.0,
            "perplexity_after": 9.0, "seconds": 10.0, "steps": max(losses_by_step),
            "checkpoints": {str(s): {"tokens": 100 * s, "dev": [((m + e) * 4, 4) for e in shared]}
                            for s, m in losses_by_step.items()}}


def test_the_length_is_where_the_order_stops_changing():
    # a is worse than b up to 12 steps, better from 24 on: the order flips between 12 and 24.
    a = _curve("a", {0: 3.0, 12: 2.9, 24: 2.5, 48: 2.3, 96: 2.2})
    b = _curve("b", {0: 2.8, 12: 2.7, 24: 2.7, 48: 2.6, 96: 2.5})
    got = sizing.length([a, b], ["a", "b"])
    assert got["stable"] and got["L"] == 24 and got["flips_by_L"][12] == 1
    assert got["final_steps"] == 48 and sizing.length([a, b], ["a", "b"], "constant")["final_steps"] == 24
    changes = sizing.order_changes([a, b], ["a", "b"])
    assert set(changes["L"]) == {12, 24, 48}          # 0 has no meaningful double, 96 has none measured


def test_a_flip_after_a_stable_doubling_moves_the_length_on():
    # stable between 12 and 24, flipping again between 24 and 48: the length is 48, not 12
    a = _curve("a", {12: 2.5, 24: 2.5, 48: 2.9, 96: 2.9})
    b = _curve("b", {12: 2.7, 24: 2.7, 48: 2.7, 96: 2.7})
    got = sizing.length([a, b], ["a", "b"])
    assert got["flips_by_L"] == {12: 0, 24: 1, 48: 0} and got["L"] == 48


def test_a_length_that_never_settles_is_said_plainly():
    a = _curve("a", {12: 2.9, 24: 2.5, 48: 2.9})
    b = _curve("b", {12: 2.7, 24: 2.7, 48: 2.7})
    got = sizing.length([a, b], ["a", "b"])
    assert not got["stable"] and "still changes" in got["statement"]
    with pytest.raises(QRError, match="double"):
        sizing.length([_curve("a", {12: 1.0, 20: 1.0}), _curve("b", {12: 1.0, 20: 1.0})], ["a", "b"])


def test_a_rung_far_above_16_bit_does_not_survive():
    curves = [_curve("lora16", {0: 3.0, 48: 2.0}), _curve("hqq4", {0: 3.2, 48: 2.1}),
              _curve("hqq2", {0: 9.0, 48: 6.0})]
    ladder = sizing.ladder(curves, max_gap=0.5).set_index("method")
    assert ladder.loc["hqq4", "survives"] and not ladder.loc["hqq2", "survives"]
    assert ladder.loc["hqq2", "gap_to_lora16_step48"] == pytest.approx(4.0)
    # At a shorter checkpoint a rung that survives long training can still be far behind.
    curves.append(_curve("hqq3", {0: 6.0, 24: 3.5, 48: 2.3}))
    curves[0]["checkpoints"]["24"] = _curve("x", {24: 2.5})["checkpoints"]["24"]
    at = sizing.ladder(curves, max_gap=0.5, at=24).set_index("method")
    assert at.loc["hqq3", "survives"] and not at.loc["hqq3", "survives_at_step24"]
    assert at.loc["hqq3", "gap_to_lora16_step24"] == pytest.approx(1.0)
    assert np.isnan(at.loc["hqq4", "gap_to_lora16_step24"])          # not measured there: said, not guessed


def test_sizing_on_smoke_scores_the_dev_split_only_and_reads_back(smoke, base, tmp_path, monkeypatch):
    model, tok = base
    profile = dataclasses.replace(smoke, sizing=dataclasses.replace(smoke.sizing, methods=("lora16", "hqq2"),
                                                                    checkpoints=(0, 1, 2)))
    splits = load_finetune(profile.data)
    test_prompts = {ex.prompt for ex in splits.test}
    scored = []
    real = sizing.example_losses

    def spy(model_, tok_, examples, *a, **k):
        scored.append([ex.prompt for ex in examples])
        return real(model_, tok_, examples, *a, **k)
    monkeypatch.setattr(sizing, "example_losses", spy)
    layout = Layout(tmp_path)
    got = sizing.run(profile, layout, model, tok, progress=False)
    assert [c["method"] for c in got] == ["lora16", "hqq2"]
    assert all(sorted(map(int, c["checkpoints"])) == [0, 1, 2] for c in got)
    assert all(c["checkpoints"]["2"]["tokens"] > c["checkpoints"]["1"]["tokens"] > 0 for c in got)
    assert len(scored) == 6 and all(len(s) == profile.data.n_dev for s in scored)
    assert not any(p in test_prompts for s in scored for p in s)
    assert {ex.prompt for ex in splits.dev} == set(scored[0])
    # Unchanged configuration: read back, nothing trains.
    monkeypatch.setattr(sizing, "train", lambda *a, **k: pytest.fail("a finished curve was retrained"))
    again = sizing.run(profile, layout, model, tok, progress=False)
    assert again == got
    # What the final runs' plan or the method's wording says is not part of a curve: a longer final
    # fine-tuning set (covered by the curves' own pairs) and a renamed method read the curves back.
    def final_pairs(n):
        return dataclasses.replace(profile, data=dataclasses.replace(profile.data, n_train=n))
    need = 2 * profile.finetune.batch_size                                # the longest checkpoint's pairs
    assert sizing.data_config(final_pairs(1), profile.sizing) == sizing.data_config(final_pairs(need), profile.sizing)
    assert sizing.data_config(final_pairs(1), profile.sizing).n_train == need
    renamed = dataclasses.replace(load_method("hqq2"), name="renamed", description="", multi_seed=True)
    assert sizing.setting(profile, renamed) == sizing.setting(profile, load_method("hqq2"))
    assert [c["method"] for c in sizing.curves(layout, ("lora16", "hqq2"))] == ["lora16", "hqq2"]
    table = sizing.table(got)
    assert set(table["step"]) == {0, 1, 2} and (table["dev_loss"] > 0).all()


def test_sizing_refuses_without_a_dev_split(smoke):
    profile = dataclasses.replace(smoke, data=dataclasses.replace(smoke.data, n_dev=0))
    with pytest.raises(QRError, match="data.n_dev"):
        sizing.data(profile, profile.sizing)


def test_the_dev_split_leaves_the_other_splits_where_they_were(smoke):
    without = load_finetune(dataclasses.replace(smoke.data, n_dev=0))
    with_dev = load_finetune(smoke.data)
    assert with_dev.val == without.val and with_dev.test == without.test
    assert not {ex.prompt for ex in with_dev.dev} & {ex.prompt for ex in with_dev.train + with_dev.test + with_dev.val}
