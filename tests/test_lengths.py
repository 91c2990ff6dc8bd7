"""The length study: the primary claims' runs at several multiples of the final training, on the same
test examples, each primary claim judged at every length with a trend labelled as extrapolation."""
import json

import pytest

from qr_lib.layout import Layout
from qr_lib.workbook import finetune, lengths
from qr_lib.workbook.profiles import load_profile


@pytest.fixture(scope="module")
def base():
    from qr_lib.models import load_model
    return load_model("tiny", "float32")


def test_each_factor_trains_on_the_same_test_examples_and_every_primary_claim_is_judged_at_every_length(base, tmp_path):
    model, tok = base
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"claims": [
        {"id": "q_vs_l", "a": "hqq4", "relation": "beats", "b": ["lora16"], "label": "16-bit LoRA", "where": "a test"},
        {"id": "n_vs_l", "a": "nf4", "relation": "beats", "b": ["lora16"], "label": "16-bit LoRA", "where": "a test"},
        {"id": "n_vs_q", "a": "nf4", "relation": "beats", "b": ["hqq4"], "label": "HQQ", "where": "not primary"}]}))
    # Half the smoke's training pairs (8 steps of 4 at 1x, 32 at 4x): enough to tell the lengths apart.
    profile = load_profile("smoke", {"finetune.methods": ["lora16", "hqq4", "nf4"], "finetune.seeds": [0, 1],
                                     "data.n_train": 32,
                                     "eval.tasks": [], "lengths.factors": [1, 2, 4],
                                     "comparison.claims_file": str(claims), "comparison.primary": ["q_vs_l", "n_vs_l"]})
    layout = Layout(tmp_path / "results")
    finetune.run_all(profile, layout, model, tok, progress=False)
    assert lengths.methods(profile) == ["hqq4", "lora16", "nf4"]
    planned = lengths.plan(profile, layout)
    assert [(p.method.id, p.seed, p.runs.root.name) for p in planned] == [
        (m, s, f"x{f}") for f in (4, 2) for s in (0, 1) for m in ("hqq4", "lora16", "nf4")]
    lengths.run(profile, layout, model, tok, progress=False)
    short = finetune.results(layout, "hqq4")[0]
    for f in (2, 4):
        long_ = finetune.results(layout.at_length(f), "hqq4")[0]
        assert long_.train["steps"] == f * short.train["steps"] and long_.train["epochs"] == pytest.approx(1.0)
        assert long_.test_examples["tokens"] == short.test_examples["tokens"]      # the same test examples
        assert long_.dev_loss is None and long_.benchmarks == {}
    got, trend = lengths.save(profile, layout)
    assert layout.table("lengths").exists() and layout.figure("lengths").exists()
    assert sorted(set(got["id"])) == ["n_vs_l", "q_vs_l"]                       # the primary family only
    assert sorted(got["steps"].unique()) == [short.train["steps"] * f for f in (1, 2, 4)]
    assert (got["p_holm"] >= 0).all() and (got["ci95_low"] <= got["a_minus_b"]).all()
    row = trend.set_index("id").loc["q_vs_l"]
    assert row["lengths"] == 3 and row["verdicts"].count("/") == 2
    g = got[got["id"] == "q_vs_l"]
    assert row["first"] == pytest.approx(g["a_minus_b"].iloc[0]) and row["last"] == pytest.approx(g["a_minus_b"].iloc[-1])
    # A run at a length trained on an allocation the final run no longer uses (a selection since replaced)
    # is left out of that length's claims, with a warning, rather than compared as if it were the same method.
    from qr_lib.store import read_artifact, write_artifact
    path = layout.at_length(2).run("hqq4", 0).result
    record = read_artifact(path)
    ranks = record["result"]["allocation"]["ranks"]
    record["result"]["allocation"]["ranks"] = [4 if r != 4 else 8 for r in ranks]
    write_artifact(path, record["config"], record["result"])
    final = lengths.allocations(finetune.results(layout))
    assert lengths.superseded(final, finetune.results(layout.at_length(2))) == {short.name}
    assert lengths.superseded(final, finetune.results(layout.at_length(4))) == set()
    with pytest.warns(UserWarning, match="no longer use"):
        again = lengths.table(profile, layout)
    assert "q_vs_l" not in set(again.loc[again["factor"] == 2, "id"])
    assert "q_vs_l" in set(again.loc[again["factor"] == 4, "id"])
    # A longer run recorded under a method's old name (made before a rename) does not rename the claim.
    for seed in (0, 1):
        path = layout.at_length(4).run("nf4", seed).result
        record = read_artifact(path)
        write_artifact(path, record["config"], {**record["result"], "name": "an old name"})
    renamed = lengths.table(profile, layout)
    assert renamed.groupby("id")["claim"].nunique().eq(1).all()
    assert "an old name" not in " ".join(renamed["claim"])
