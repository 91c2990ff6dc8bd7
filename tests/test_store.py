"""The stage protocol (store.cached): an artifact is read back only while it is whole and its stored
config equals the current one; a changed config or a tampered number means it is recomputed."""
import dataclasses
import json
import shutil

import pytest

from qr_lib import store
from qr_lib.layout import Layout


def _tamper(path, edit):
    record = json.loads(path.read_text())
    edit(record["result"])
    path.write_text(json.dumps(record))


def test_the_protocol_reads_back_recomputes_on_a_new_config_and_detects_tampering(tmp_path):
    path, calls = tmp_path / "stage.json", []

    def compute():
        calls.append(1)
        return {"loss": 0.5, "steps": (1, 2)}
    assert store.cached(path, {"lr": 1e-4}, compute) == {"loss": 0.5, "steps": [1, 2]}   # JSON types either way
    assert store.cached(path, {"lr": 1e-4}, compute) == {"loss": 0.5, "steps": [1, 2]} and len(calls) == 1
    store.cached(path, {"lr": 2e-4}, compute)                                            # one field changed
    assert len(calls) == 2 and json.loads(path.read_text())["config"] == {"lr": 2e-4}
    _tamper(path, lambda r: r.update(loss=0.001))                                          # one number edited
    with pytest.warns(UserWarning, match="damaged or was edited"):
        assert store.cached(path, {"lr": 2e-4}, compute)["loss"] == 0.5
    assert len(calls) == 3
    path.write_text(path.read_text()[:30])                                                 # truncated
    with pytest.warns(UserWarning, match="damaged or was edited"):
        store.cached(path, {"lr": 2e-4}, compute)
    assert len(calls) == 4
    store.cached(path, {"lr": 2e-4}, compute, valid=lambda result: result["loss"] < 0.1)   # still valid?
    assert len(calls) == 5
    assert store.stored_result(path, {"lr": 2e-4})["loss"] == 0.5 and store.stored_result(path, {"lr": 0}) is None


def test_a_keyed_config_carries_its_own_hash():
    cfg = store.keyed({"a": 1})
    assert cfg["key"] == store.content_hash({"a": 1}) and store.keyed({"a": 2})["key"] != cfg["key"]


@pytest.fixture
def search_copy(smoke_run, tmp_path):
    """A private copy of the session's smoke search, to change and tamper with."""
    layout, _ = smoke_run
    shutil.copytree(layout.root, tmp_path / "run")
    return Layout(tmp_path / "run")


@pytest.mark.parametrize("stage", ["nsga", "bo", "search"])
def test_every_search_stage_recomputes_a_tampered_artifact(smoke, base, search_copy, stage):
    from qr_lib.algorithm import search
    path = getattr(search_copy, stage)
    before = json.loads(path.read_text())["result"]
    _tamper(path, lambda r: r.update(tampered=True))
    with pytest.warns(UserWarning, match=f"{path.name} is damaged or was edited"):
        search.run(smoke, search_copy, *base, progress=False)
    after = json.loads(path.read_text())["result"]
    assert "tampered" not in after
    for key in ("pareto", "selected", "selected_at", "steps"):          # recomputed to the same answer
        assert after.get(key) == before.get(key), key


@pytest.mark.parametrize("field, stage", [("nsga", "nsga"), ("bo", "bo")])
def test_a_changed_search_setting_recomputes_its_stage_and_what_follows(smoke, base, search_copy, field, stage):
    from qr_lib.algorithm import search
    config = {"nsga": ("mutation_prob", 0.2), "bo": ("alpha", 0.5)}[field]
    changed = dataclasses.replace(smoke, **{field: dataclasses.replace(getattr(smoke, field), **dict([config]))})
    old = {s: json.loads(getattr(search_copy, s).read_text())["config"] for s in ("nsga", "bo", "search")}
    search.run(changed, search_copy, *base, progress=False)
    new = {s: json.loads(getattr(search_copy, s).read_text())["config"] for s in ("nsga", "bo", "search")}
    assert new[stage] != old[stage] and new["search"] != old["search"]
    if stage == "bo":
        assert new["nsga"] == old["nsga"]                     # Phase II is read back, not redone


def test_a_final_run_recomputes_on_a_changed_setting_or_a_tampered_loss(smoke, base, tmp_path, monkeypatch):
    from qr_lib.workbook import finetune
    from qr_lib.workbook.methods import load_method
    quick = dataclasses.replace(smoke, finetune=dataclasses.replace(smoke.finetune, max_steps=2),
                                eval=dataclasses.replace(smoke.eval, tasks=()))
    layout, method = Layout(tmp_path), load_method("hqq4")
    first = finetune.run(quick, layout, method, 0, *base, progress=False)
    calls, real = [], finetune.train
    monkeypatch.setattr(finetune, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    finetune.run(quick, layout, method, 0, *base, progress=False)
    assert calls == []
    _tamper(layout.run("hqq4", 0).result, lambda r: r.update(test_loss=0.0))
    with pytest.warns(UserWarning, match="damaged or was edited"):
        again = finetune.run(quick, layout, method, 0, *base, progress=False)
    assert len(calls) == 1 and again.test_loss == pytest.approx(first.test_loss)
    slower = dataclasses.replace(quick, finetune=dataclasses.replace(quick.finetune, lr=1e-4))
    finetune.run(slower, layout, method, 0, *base, progress=False)
    assert len(calls) == 2


def test_a_damaged_evaluation_record_is_repaired_though_the_search_is_finished(smoke, base, search_copy):
    """nsga.json and bo.json are whole, so the search reads them back; the record one of them cites was
    truncated: the rerun names it and recomputes it to the same score."""
    from qr_lib.algorithm import search
    key = json.loads(search_copy.nsga.read_text())["result"]["evaluations"][0]["key"]
    path = search_copy.evaluation(key)
    before = json.loads(path.read_text())["result"]
    path.write_text(path.read_text()[:100])
    with pytest.warns(UserWarning, match=f"{key}.json is damaged or was edited"):
        search.run(smoke, search_copy, *base, progress=False)
    after = json.loads(path.read_text())["result"]
    assert after["objective"] == pytest.approx(before["objective"]) and after["key"] == key


@pytest.mark.integration
def test_an_edited_evaluation_record_is_repaired_on_the_reproduce_path(smoke_run, tmp_path, monkeypatch):
    """The same repair through `make reproduce` (notebook 04), with every stage artifact present: a
    record whose objective was edited by hand is recomputed to its real score."""
    from qr_lib.workbook import reproduce
    layout, _ = smoke_run
    shutil.copytree(layout.root, tmp_path / "smoke")
    copy = Layout(tmp_path / "smoke")
    key = json.loads(copy.nsga.read_text())["result"]["evaluations"][0]["key"]
    before = json.loads(copy.evaluation(key).read_text())["result"]["objective"]
    _tamper(copy.evaluation(key), lambda r: r.update(objective=0.5))
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    reproduce.run("smoke", only=["04"])
    assert json.loads(copy.evaluation(key).read_text())["result"]["objective"] == pytest.approx(before)


def test_a_reader_that_lists_records_says_it_leaves_a_damaged_one_out_rather_than_recomputing(tmp_path):
    from qr_lib.store import write_artifact
    from qr_lib.workbook import sizing
    layout = Layout(tmp_path)
    for method in ("a", "b"):
        write_artifact(layout.sizing_curve(method), {"method": method}, {"method": method, "checkpoints": []})
    _tamper(layout.sizing_curve("b"), lambda r: r.update(method="edited"))
    with pytest.warns(UserWarning, match="b.json is damaged or was edited .*; leaving it out here"):
        assert [c["method"] for c in sizing.curves(layout)] == ["a"]



def _other_torch(monkeypatch):
    """This process reports another torch version from here on (store.versions is read once per process)."""
    real = store.metadata.version
    monkeypatch.setattr(store.metadata, "version", lambda name: "0.0.1+other" if name == "torch" else real(name))
    store.versions.cache_clear()


@pytest.fixture
def versions_restored():
    yield
    store.versions.cache_clear()        # after monkeypatch has put the real lookup back


def _made_by(path):
    return json.loads(path.read_text())["environment"]["packages"]["torch"]


def test_a_record_made_under_another_library_version_is_recomputed_not_read(tmp_path, monkeypatch,
                                                                             versions_restored):
    path, calls = tmp_path / "stage.json", []
    store.cached(path, {"lr": 1e-4}, lambda: calls.append(1) or {"loss": 0.5})
    assert store.stored_result(path, {"lr": 1e-4}) == {"loss": 0.5}
    _other_torch(monkeypatch)
    assert store.stored_result(path, {"lr": 1e-4}) is None
    store.cached(path, {"lr": 1e-4}, lambda: calls.append(1) or {"loss": 0.5})
    assert len(calls) == 2 and _made_by(path) == "0.0.1+other"    # the same result, written again with
    store.cached(path, {"lr": 1e-4}, lambda: calls.append(1) or {"loss": 0.5})  # the version that made it
    assert len(calls) == 2


def test_a_tracked_version_change_invalidates_every_kind_of_artifact_alike(smoke, base, search_copy, tmp_path,
                                                                            monkeypatch, versions_restored):
    """One fingerprint (a stage's config and store.versions): Phase I, every proxy evaluation, Phase II,
    Phase III, the search, a final run and a quantized block are all recomputed under another torch."""
    from qr_lib.algorithm import search
    from qr_lib.algorithm.quant.cache import BlockCache
    from qr_lib.workbook import finetune
    from qr_lib.workbook.methods import load_method
    quick = dataclasses.replace(smoke, finetune=dataclasses.replace(smoke.finetune, max_steps=2),
                                eval=dataclasses.replace(smoke.eval, tasks=()))
    final, method = Layout(tmp_path / "final"), load_method("hqq4")
    finetune.run(quick, final, method, 0, *base, progress=False)
    cache = BlockCache(tmp_path / "blocks", smoke.quant)
    block = cache.path("block", 4)
    stages = [search_copy.sensitivity, search_copy.nsga, search_copy.bo, search_copy.search,
              *search_copy.evaluations.glob("*.json"), final.run("hqq4", 0).result]
    before = json.loads(search_copy.search.read_text())["result"]
    assert {_made_by(p) for p in stages} != {"0.0.1+other"}

    _other_torch(monkeypatch)
    search.run(smoke, search_copy, *base, progress=False)
    finetune.run(quick, final, method, 0, *base, progress=False)
    assert {p.name: _made_by(p) for p in stages} == {p.name: "0.0.1+other" for p in stages}
    assert cache.path("block", 4) != block
    after = json.loads(search_copy.search.read_text())["result"]
    assert after["selected"] == before["selected"]                   # recomputed to the same answer
    assert {k: v["allocation"] for k, v in after["selected_at"].items()} == \
        {k: v["allocation"] for k, v in before["selected_at"].items()}
