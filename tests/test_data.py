from qr_lib import data as D


def test_pool_drops_items_that_are_also_evaluation_items(sources):
    pool = D.commonsense_pool(sources)
    assert set(pool) == set(D.COMMONSENSE_TASKS)
    assert all(len(v) == 24 for v in pool.values())  # the planted ARC-Easy eval item is gone
    eval_keys = D.evaluation_keys(sources)
    assert not {D.normalize(e.key) for v in pool.values() for e in v} & eval_keys


def test_finetune_split_is_deterministic_disjoint_and_mixed(sources):
    train, val = D.load_finetune("commonsense", 90, 18, seed=3, sources=sources)
    again = D.load_finetune("commonsense", 90, 18, seed=3, sources=sources)
    other = D.load_finetune("commonsense", 90, 18, seed=4, sources=sources)
    assert (train, val) == again and (train, val) != other
    assert len(train) == 90 and len(val) == 18
    assert not {e.key for e in train} & {e.key for e in val}
    assert len({e.source for e in val}) == len(D.COMMONSENSE_TASKS)
    assert all(e.answer and e.prompt for e in train)


def test_winogrande_examples_fill_the_blank(sources):
    pool = D.commonsense_pool(sources)
    ex = pool["winogrande"][0]
    assert "_" not in ex.prompt + ex.answer and ex.key.count("_") == 1


def test_texts_are_disjoint_and_deterministic(sources):
    calib, held = D.load_texts("lambada", 10, 10, seed=0, sources=sources)
    assert len(calib) == 10 and len(held) == 10 and not set(calib) & set(held)
    assert (calib, held) == D.load_texts("lambada", 10, 10, seed=0, sources=sources)


def test_benchmark_docs_are_normalized(sources):
    for task in D.BENCHMARKS:
        docs = D.benchmark_docs(task, sources)
        assert docs, task
        if "choices" in docs[0]:
            assert all(0 <= d["gold"] < len(d["choices"]) for d in docs), task
    assert {d["subject"] for d in D.benchmark_docs("mmlu", sources)} == {"anatomy", "astronomy"}


def test_gsm8k_fewshot_has_eight_exemplars(sources):
    shots = D.gsm8k_fewshot(sources)
    assert shots.count("Question: ") == 8 and shots.count("So the answer is") == 8


def test_bad_source_names_say_what_works(sources):
    import pytest
    from qr_lib.errors import QRError
    with pytest.raises(QRError, match="`commonsense` works offline"):
        D.load_finetune("alpacca", 1, 1, 0, sources)
    with pytest.raises(QRError, match="only 40 exist"):
        D.load_texts("lambada", 30, 30, 0, sources)
