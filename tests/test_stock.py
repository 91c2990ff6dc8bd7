"""lm-eval's stock task formats, offline: the same prompts as the installed lm-eval, and a real run."""
import json
from pathlib import Path

import pytest
import yaml

from qr_lib.evaluate import TASK_DIR

FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def _yaml(path: Path) -> dict:
    data = yaml.load(path.read_text(), Loader=_Loader)
    if "include" in data:
        data = {**_yaml(path.parent / data.pop("include")), **data}
    return data


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "hellaswag", "piqa"])
def test_the_offline_twins_ask_what_lm_evals_stock_tasks_ask(task):
    import lm_eval
    stock_dir = Path(lm_eval.__file__).parent / "tasks" / ("arc" if task.startswith("arc") else task)
    stock = _yaml(stock_dir / f"{task}.yaml")
    ours = _yaml(TASK_DIR / f"stock_{task}.yaml")
    for field in FIELDS:
        assert ours[field] == stock[field], (task, field)


def test_a_long_split_is_sampled_the_same_way_every_run():
    from qr_lib.workbook import stock
    assert stock.sample(100, None) is None and stock.sample(100, 100) is None
    picked = stock.sample(10_042, 50)
    assert picked == stock.sample(10_042, 50) and len(set(picked)) == 50 and picked == sorted(picked)
    assert max(picked) > 5_000                                          # not the first documents


@pytest.mark.integration
def test_the_stock_table_sets_our_scores_beside_the_published_ones(tmp_path, embedded32, monkeypatch):
    from qr_lib.layout import Layout
    from qr_lib.workbook import stock
    from qr_lib.workbook.profiles import load_profile
    model, tok = embedded32
    layout = Layout(tmp_path)
    table = stock.run(load_profile("default"), layout, model, tok, max_docs=4, progress=False)
    assert list(table["task"]) == ["arc_easy", "arc_challenge", "hellaswag", "piqa"]
    assert (table["n"] == 4).all() and (table["of"] > 1000).all() and table["published (%)"].notna().all()
    assert table["95% interval (points)"].notna().all()
    assert layout.table("stock_lm_eval").exists()
    assert json.loads(layout.stock("piqa", "sample4").read_text())["result"]["seconds"] > 0
    logged = sorted(p.name for p in layout.stock_logs.iterdir())
    assert "samples_stock_piqa.jsonl.gz" in logged and not any(n.endswith(".jsonl") for n in logged)
    again = stock.run(load_profile("default"), layout, model, tok, max_docs=4, progress=False)  # cached per task
    assert again.equals(table)
    stored = layout.stock("piqa", "sample4")                           # one number tampered
    record = json.loads(stored.read_text())
    record["result"]["acc"] = 1.0
    stored.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="damaged or was edited"):
        assert stock.run(load_profile("default"), layout, model, tok, max_docs=4, progress=False).equals(table)
    # Scores of another compute dtype are not reused: the stored config says which dtype made them.
    bf16 = load_profile("default", {"dtype": "bfloat16"})
    calls = []
    monkeypatch.setattr(stock, "run_tasks", lambda *a, **k: calls.append(1) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        stock.run(bf16, layout, model, tok, max_docs=4, progress=False)
    assert calls == [1]
