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
def test_the_stock_table_sets_our_scores_beside_the_published_ones(tmp_path, embedded32):
    from qr_lib.workbook import stock
    from qr_lib.workbook.profiles import load_profile
    model, tok = embedded32
    table = stock.run(load_profile("default"), tmp_path, max_docs=4, base=model, tok=tok, progress=False)
    assert list(table["task"]) == ["arc_easy", "arc_challenge", "hellaswag", "piqa"]
    assert (table["n"] == 4).all() and (table["of"] > 1000).all() and table["published (%)"].notna().all()
    assert table["95% interval (points)"].notna().all()
    assert (tmp_path / "tables" / "stock_lm_eval.md").exists()
    assert json.loads((tmp_path / "stock" / "piqa-sample4.json").read_text())["result"]["seconds"] > 0
    logged = sorted(p.name for p in (tmp_path / "stock" / "lm_eval").iterdir())
    assert "samples_stock_piqa.jsonl.gz" in logged and not any(n.endswith(".jsonl") for n in logged)
    again = stock.run(load_profile("default"), tmp_path, max_docs=4, progress=False)     # cached per task
    assert again.equals(table)
