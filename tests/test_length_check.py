"""The length check: the same final runs at twice the training, on the same test examples, and every
claim judged at both lengths."""
import json

import pytest

from qr_lib.layout import Layout
from qr_lib.workbook import comparison, finetune, length_check
from qr_lib.workbook.profiles import load_profile


@pytest.fixture(scope="module")
def base():
    from qr_lib.models import load_model
    return load_model("tiny", "float32")


def test_the_check_trains_twice_as_long_on_the_same_test_examples_and_judges_each_claim(base, tmp_path):
    model, tok = base
    profile = load_profile("smoke", {"finetune.methods": ["lora16", "hqq4"], "finetune.seeds": [0, 1],
                                     "sizing.check_methods": ["lora16", "hqq4", "nf4"], "eval.tasks": []})
    layout = Layout(tmp_path)
    for method, seed in finetune.plan(profile):
        finetune.run(profile, layout, method, seed, model, tok, progress=False)
    assert [(m.id, s) for m, s in length_check.plan(profile)] == [("lora16", 0), ("hqq4", 0), ("lora16", 1), ("hqq4", 1)]
    out = length_check.run(profile, layout, model, tok, progress=False)
    assert out.root == tmp_path / "longer"
    short, long_ = finetune.results(layout, "hqq4")[0], finetune.results(out, "hqq4")[0]
    assert long_.train["steps"] == 2 * short.train["steps"] and long_.train["epochs"] == pytest.approx(1.0)
    assert long_.test_examples["tokens"] == short.test_examples["tokens"]      # the same test examples
    assert long_.dev_loss is None and long_.benchmarks == {}
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"claims": [{"a": "hqq4", "relation": "beats", "b": ["lora16"],
                                              "label": "16-bit LoRA", "where": "a test"}]}))
    got = length_check.save(profile, layout, claims)
    assert layout.table("length_check").exists() and layout.figure("length_check").exists()
    assert list(got["claim"]) == ["QLoRA HQQ 4-bit beats 16-bit LoRA"]
    row = got.iloc[0]
    assert row["steps_longer"] == 2 * row["steps_L"] and row["seeds_longer"] == 2
    assert row["holds"] == (row["verdict_L"] == row["verdict_longer"])
    final = comparison.claims(layout, profile.comparison, claims).set_index("claim")
    assert row["p_holm_L"] == final.loc[row["claim"], "p_holm"] and row["verdict_L"] == final.loc[row["claim"], "verdict"]
    assert row["same_sign"] == ((row["a_minus_b_L"] > 0) == (row["a_minus_b_longer"] > 0))
    assert row["ci95_low_longer"] <= row["a_minus_b_longer"] <= row["ci95_high_longer"]
