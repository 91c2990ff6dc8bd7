"""The comparison table: every finished run under results/<profile>/runs/, one row per method.

Columns: memory (formula bytes of the blocks, average bits), trainable parameters, each task's
headline metric (see evaluate.py), their average, loss on the held-out test split and held-out
perplexity; mean and standard deviation over seeds. Claims (reference/claims.json) are paired
comparisons over the runs' per-example test losses and per-document benchmark results (stats.py).
Reads artifacts only.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from .. import PACKAGE_DIR
from ..config import ComparisonConfig
from ..errors import QRError
from ..evaluate import CHANCE, headline
from ..layout import Layout
from . import stats
from .finetune import RunResult, results

REFERENCE = PACKAGE_DIR / "reference" / "paper_results.json"


def runs(layout: Layout) -> pd.DataFrame:
    """One row per (method, seed) with every number the table needs."""
    rows = []
    for r in results(layout):
        row = {"method": r.method, "name": r.name, "seed": r.seed,
               "memory_MiB": r.memory_bytes / 2**20, "avg_bits": r.avg_bits,
               "trainable_params": r.trainable_parameters, "test_loss": r.test_loss,
               "heldout_ppl": r.heldout_perplexity, "train_seconds": r.train["seconds"],
               "peak_GiB": r.train["peak_memory"]["peak_bytes"] / 2**30, "same_run_as": r.same_run_as or ""}
        for task, metrics in r.benchmarks.items():
            row[task], row[f"{task}_stderr"] = headline(metrics)
            row[f"{task}_n"] = metrics["n"]
        rows.append(row)
    df = pd.DataFrame(rows)
    tasks = [c for c in df.columns if f"{c}_stderr" in df.columns]
    if tasks:
        df["average"] = df[tasks].mean(axis=1)
        # The mean of independent task accuracies: its binomial standard error combines the tasks'.
        df["average_stderr"] = (df[[f"{t}_stderr" for t in tasks]] ** 2).sum(axis=1, min_count=1) ** 0.5 / len(tasks)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds; 'seeds' says how many runs each row averages."""
    if df.empty:
        return df
    skip = {"method", "name", "seed", "same_run_as"} | {c for c in df.columns if c.endswith(("_stderr", "_n"))}
    values = [c for c in df.columns if c not in skip]
    g = df.groupby(["method", "name"], sort=False)
    mean, std = g[values].mean(), g[values].std(ddof=1)
    out = mean.copy()
    for c in values:
        out[f"{c}_std"] = std[c]
    # A benchmark's binomial standard error (lm-eval's), averaged over seeds: what one run's accuracy
    # is uncertain by, whatever the number of seeds.
    for c in [c for c in df.columns if c.endswith("_stderr")]:
        out[c] = g[c].mean()
    out.insert(0, "seeds", g.size())
    out["same_run_as"] = g["same_run_as"].first() if "same_run_as" in df else ""
    return out.reset_index()


def destroyed(table: pd.DataFrame, gap: float, reference: str = "lora16") -> set:
    """Methods whose mean test loss is more than `gap` nats above the reference's (ComparisonConfig.
    destroyed_gap): quantization has destroyed them, and figures draw them apart."""
    ref = table.loc[table["method"] == reference, "test_loss"]
    if ref.empty:
        return set()
    return set(table.loc[table["test_loss"] > float(ref.iloc[0]) + gap, "method"])


def peak_memory(per_seed: pd.DataFrame, reference: str = "nf4") -> pd.DataFrame:
    """Each method's peak training memory (every run's own, memory.PeakMemory), mean and max over
    seeds, and its ratio to the reference method (uniform 4-bit QLoRA, NF4, by default)."""
    g = per_seed.groupby(["method", "name"], sort=False)["peak_GiB"].agg(["mean", "max", "count"]).reset_index()
    g = g.rename(columns={"mean": "peak GiB (mean)", "max": "peak GiB (max)", "count": "runs"})
    ref = g.loc[g["method"] == reference, "peak GiB (mean)"]
    g[f"/ {reference}"] = g["peak GiB (mean)"] / ref.iloc[0] if len(ref) else float("nan")
    return g


def formatted(table: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """The readable table: accuracies in %, 'mean ± std' where a method has several seeds."""
    def cell(row, col, scale=1.0, digits=1):
        m, s = row[col] * scale, row.get(f"{col}_std")
        return f"{m:.{digits}f}" if row["seeds"] < 2 or pd.isna(s) else f"{m:.{digits}f} ± {s * scale:.{digits}f}"
    out = pd.DataFrame({"method": table["name"], "seeds": table["seeds"],
                        "memory (MiB)": table["memory_MiB"].round(1), "avg bits": table["avg_bits"].round(2),
                        "trainable": table["trainable_params"].astype(int)})
    for t in tasks + (["average"] if tasks else []):
        out[t] = [cell(r, t, 100) for _, r in table.iterrows()]
    out["test loss"] = [cell(r, "test_loss", 1, 3) for _, r in table.iterrows()]
    out["held-out ppl"] = [cell(r, "heldout_ppl", 1, 1) for _, r in table.iterrows()]
    return out


def task_power(data: dict, seed: int = 0, power: float = 0.8, alpha: float = 0.05) -> pd.DataFrame:
    """What each benchmark column can tell at this run's size (the first seed's runs, `data` from
    per_example): its n (documents every method scored), chance, the methods' accuracy range, and the
    smallest paired difference between two methods it detects with `power` at two-sided `alpha`:
    (z_{1-alpha/2} + z_power) x sqrt(discordance / n), from the median discordance (the share of
    documents two methods answer differently) over the pairs of methods. A column whose methods all sit
    within two standard errors of chance, or whose detectable difference exceeds the spread between
    its methods, says it cannot separate them."""
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    runs_ = {m: d["docs"] for (m, s), d in data.items() if s == seed and d["docs"]}
    rows = []
    for task in sorted({t for docs in runs_.values() for t in docs}):
        have = {m: docs[task] for m, docs in runs_.items() if task in docs}
        ids = sorted(set.intersection(*(set(v) for v in have.values())))
        if not ids:
            continue
        values = {m: np.array([v[i] for i in ids], dtype=float) for m, v in have.items()}
        acc = {m: float(v.mean()) for m, v in values.items()}
        names = list(values)
        disc = [float(np.mean(values[a] != values[b])) for i, a in enumerate(names) for b in names[i + 1:]]
        n = len(ids)
        # No document answered differently by any two methods: no discordance to scale, so no
        # detectable difference can be stated (GSM8K at zero everywhere).
        detectable = z * np.sqrt(np.median(disc) / n) if disc and np.median(disc) > 0 else float("nan")
        chance = CHANCE.get(task.removeprefix("qr_"), float("nan"))
        se = np.sqrt(np.clip([a * (1 - a) for a in acc.values()], 1e-12, None) / n)
        near_chance = bool(np.all(np.abs(np.array(list(acc.values())) - chance) < 2 * se + 1e-12))
        spread = max(acc.values()) - min(acc.values())
        reading = ("at chance: cannot separate methods on this model" if near_chance else
                   "methods differ by less than it can detect" if spread < detectable else
                   "the widest gap reaches what it can detect (the paired claims decide)")
        rows.append({"task": task, "n": n, "chance": chance, "methods": len(acc), "min_accuracy": min(acc.values()),
                     "max_accuracy": max(acc.values()), "detectable_difference": float(detectable),
                     "reading": reading})
    return pd.DataFrame(rows)


CLAIMS = PACKAGE_DIR / "reference" / "claims.json"


def per_example(runs: list[RunResult]) -> dict:
    """(method, seed) -> what a paired comparison needs of finished runs (finetune.results): the test
    split's summed NLL and answer tokens per example, and each benchmark's per-document values (by doc_id)."""
    out = {}
    for r in runs:
        docs = {t: dict(zip(m["per_document"]["doc_id"], m["per_document"]["value"]))
                for t, m in r.benchmarks.items() if "per_document" in m}
        out[(r.method, r.seed)] = {"name": r.name, "nll": np.asarray(r.test_examples["nll_sum"]),
                                   "tokens": np.asarray(r.test_examples["tokens"]), "docs": docs}
    return out


def _baseline(data: dict, b: list[str], seeds: list, values):
    """b's [seeds, units] values, or [draws, seeds, units] when b is several draws that each ran at every
    seed (draws are then their own unit, with their own variance: stats.paired_interval). Draws that
    ran at one seed each (draw k at seed k) can only be averaged per seed."""
    if len(b) > 1 and all((x, s) in data for x in b for s in seeds):
        return np.stack([np.stack([values((x, s)) for s in seeds]) for x in b])
    return np.stack([np.mean([values((x, s)) for x in b if (x, s) in data], axis=0) for s in seeds])


def _paired_arrays(data: dict, a: str, b: list[str], metric: str):
    """[seeds, units] arrays for a, b's (_baseline) and the unit weights, over the seeds a shares with b;
    None when they share none."""
    seeds = sorted(s for m, s in data if m == a and any((x, s) in data for x in b))
    if metric == "test loss":
        seeds = [s for s in seeds if data[(a, s)]["nll"].size]
        if not seeds:
            return None
        tokens = data[(a, seeds[0])]["tokens"]
        rows = [(a, s) for s in seeds] + [(x, s) for x in b for s in seeds if (x, s) in data]
        if any(not np.array_equal(data[k]["tokens"], tokens) for k in rows):
            raise QRError(f"{a} and {b} were scored on different test examples; rerun them with the same "
                          "data settings (profile data.*, finetune.n_test)")
        A = np.stack([data[(a, s)]["nll"] for s in seeds])
        return A, _baseline(data, b, seeds, lambda k: data[k]["nll"]), tokens, seeds
    seeds = [s for s in seeds if data[(a, s)]["docs"] and all(data[(x, s)]["docs"] for x in b if (x, s) in data)]
    if not seeds:
        return None
    keys = [(a, s) for s in seeds] + [(x, s) for x in b for s in seeds if (x, s) in data]
    tasks = sorted(set.intersection(*(set(data[k]["docs"]) for k in keys)))
    units = [(t, d) for t in tasks for d in sorted(set.intersection(*(set(data[k]["docs"][t]) for k in keys)))]
    if not units:
        return None
    per_task = {t: sum(u[0] == t for u in units) for t in tasks}
    weight = np.array([1.0 / (per_task[t] * len(tasks)) for t, _ in units])  # the mean of task means

    def values(k):
        return np.array([data[k]["docs"][t][d] for t, d in units]) * weight
    A = np.stack([values((a, s)) for s in seeds])
    return A, _baseline(data, b, seeds, values), weight, seeds


def paired(data: dict, a: str, b: list[str], metric: str, label: str | None = None,
           cfg: ComparisonConfig = ComparisonConfig()) -> stats.Paired | None:
    """Method `a` against method(s) `b` (several = one baseline, averaged per seed) on "test loss" or
    "benchmark average", paired over shared seeds and examples; None when they share no seed."""
    arrays = _paired_arrays(data, a, b, metric)
    if arrays is None:
        return None
    A, B, w, seeds = arrays
    margin, lower = (cfg.margin_loss, True) if metric == "test loss" else (cfg.margin_accuracy, False)
    b_name = label or data[(b[0], seeds[0])]["name"]
    return stats.compare(metric, data[(a, seeds[0])]["name"], A, b_name, B, tokens=w, margin=margin,
                         lower_is_better=lower)


FAMILIES = ("primary", "benchmarks", "exploratory")


def read_claims(cfg: ComparisonConfig = ComparisonConfig()) -> list[dict]:
    """The claims the profile judges: comparison.claims_file, or the package's reference/claims.json."""
    return json.loads(Path(cfg.claims_file or CLAIMS).read_text())["claims"]


def _test_losses(data: dict) -> pd.DataFrame:
    """Each method's mean test loss over its runs (of per_example's data), as destroyed() reads it."""
    rows = [{"method": m, "test_loss": d["nll"].sum() / d["tokens"].sum()} for (m, _), d in data.items() if d["nll"].size]
    return pd.DataFrame(rows, columns=["method", "test_loss"]).groupby("method", as_index=False).mean()


def claims(runs: list[RunResult], cfg: ComparisonConfig = ComparisonConfig()) -> pd.DataFrame:
    """Every claim (read_claims) whose methods have finished runs (finetune.results), as a paired
    comparison with a 95% interval on the test loss and on the benchmark average (stats.compare), each
    judged in its family: the profile's declared primary claims on test loss (Holm across them), the
    benchmark-average rows (Holm across them), and every other test-loss claim exploratory (unadjusted).
    Whether the claim holds: 'beats' needs the verdict 'better', 'matches' needs 'better' or
    'equivalent'. `destroyed` names a side whose runs the quantization destroyed
    (ComparisonConfig.destroyed_gap): a comparison against it says little about the method."""
    data = per_example(runs)
    ruined = destroyed(_test_losses(data), cfg.destroyed_gap)
    found = []
    for c in read_claims(cfg):
        for metric in ("test loss", "benchmark average"):
            r = paired(data, c["a"], c["b"], metric, c["label"], cfg)
            if r is not None:
                family = "benchmarks" if metric != "test loss" else \
                    "primary" if c["id"] in cfg.primary else "exploratory"
                found.append((c, replace(r, family=family)))
    judged = {}
    for family in ("primary", "benchmarks"):
        members = [k for k, (_, r) in enumerate(found) if r.family == family]
        for k, r in zip(members, stats.judge_family([found[k][1] for k in members], cfg.alpha, family)):
            judged[k] = r
    rows = []
    for k, (c, r) in enumerate(found):
        r = judged.get(k, r)
        holds = r.verdict == "better" if c["relation"] == "beats" else r.verdict in ("better", "equivalent")
        gone = [m for m in (c["a"], *c["b"]) if m in ruined]
        rows.append({"id": c["id"], "claim": f"{r.a} {c['relation']} {c['label']}", **r.as_row(),
                     "b_methods": len(c["b"]), "holds": holds, "destroyed": ", ".join(gone), "where": c["where"]})
    order = {f: i for i, f in enumerate(FAMILIES)}
    out = pd.DataFrame(rows)
    return out.sort_values("family", key=lambda f: f.map(order), kind="stable").reset_index(drop=True) if len(out) else out


def paper_reference() -> dict:
    """The paper's reported numbers, with their source; shown only as labelled reference."""
    return json.loads(REFERENCE.read_text())
