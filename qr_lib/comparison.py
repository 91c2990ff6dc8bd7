"""The comparison table: every finished run under results/<profile>/runs/, one row per method.

Columns: memory (formula bytes of the blocks, average bits), trainable parameters, each task's
headline metric (see evaluate.py), their average, loss on the held-out test split and held-out
perplexity; mean and standard deviation over seeds. Reads artifacts only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .allocation import Allocation
from .evaluate import headline
from .store import read_json

REFERENCE = Path(__file__).parent / "reference" / "paper_results.json"


def runs(out_dir: Path) -> pd.DataFrame:
    """One row per (method, seed) with every number the table needs."""
    rows = []
    for path in sorted(Path(out_dir).glob("runs/*/seed*/result.json")):
        r = read_json(path)["result"]
        row = {"method": r["method"], "name": r["name"], "seed": r["seed"],
               "memory_MiB": r["memory_bytes"] / 2**20, "avg_bits": r["avg_bits"],
               "trainable_params": r["trainable_parameters"], "test_loss": r["test_loss"],
               "heldout_ppl": r["heldout_perplexity"], "train_seconds": r["train"]["seconds"],
               "peak_GiB": r["train"]["peak_memory"]["peak_bytes"] / 2**30}
        for task, metrics in r["benchmarks"].items():
            row[task], row[f"{task}_stderr"] = headline(metrics)
            row[f"{task}_n"] = metrics["n"]
        rows.append(row)
    df = pd.DataFrame(rows)
    tasks = [c for c in df.columns if f"{c}_stderr" in df.columns]
    if tasks:
        df["average"] = df[tasks].mean(axis=1)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds; 'seeds' says how many runs each row averages."""
    if df.empty:
        return df
    skip = {"method", "name", "seed"} | {c for c in df.columns if c.endswith(("_stderr", "_n"))}
    values = [c for c in df.columns if c not in skip]
    g = df.groupby(["method", "name"], sort=False)
    mean, std = g[values].mean(), g[values].std(ddof=1)
    out = mean.copy()
    for c in values:
        out[f"{c}_std"] = std[c]
    out.insert(0, "seeds", g.size())
    return out.reset_index()


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


# The paper's headline claims at the 4-bit budget: (other method, relation QR-Adaptor should have to it).
CLAIMS = [("lora16", "matches"), ("hqq4", "beats"), ("nf4", "beats")]
# (column, label, +1 if higher is better)
CLAIM_METRICS = [("test_loss", "test loss", -1), ("average", "benchmark average", +1)]


def seed_spread(a, b, col: str) -> float:
    """Two summary rows' standard deviations over seeds of `col`, added in quadrature; a one-seed row
    (no standard deviation) adds none. A gap between the rows counts only beyond it."""
    stds = [float(r.get(f"{col}_std", 0.0)) for r in (a, b)]
    return float(np.hypot(*[0.0 if np.isnan(s) else s for s in stds]))


def claims(table: pd.DataFrame, method: str = "qr_adaptor") -> pd.DataFrame:
    """Each of the paper's claims checked on this run's summary table.

    A gap counts only beyond the seeds' spread (the two standard deviations added in quadrature; a
    one-seed method contributes none): 'beats' holds when `method` is better by more than the spread,
    'matches' when it is not worse by more than it. Rows for methods that have not run are left out."""
    rows_by_id = {r["method"]: r for _, r in table.iterrows()}
    if method not in rows_by_id:
        return pd.DataFrame()
    ours, rows = rows_by_id[method], []
    for other_id, relation in CLAIMS:
        if other_id not in rows_by_id:
            continue
        other = rows_by_id[other_id]
        for col, label, sign in CLAIM_METRICS:
            if col not in table.columns:
                continue
            spread = seed_spread(ours, other, col)
            advantage = sign * (ours[col] - other[col])  # > 0: ours is better
            holds = advantage > spread if relation == "beats" else advantage >= -spread
            rows.append({"claim": f"{ours['name']} {relation} {other['name']}", "metric": label,
                         "ours": ours[col], "other": other[col], "ours_better_by": advantage,
                         "seed_spread": spread, "seeds": f"{int(ours['seeds'])} vs {int(other['seeds'])}",
                         "holds": bool(holds)})
    return pd.DataFrame(rows)


def _setting(config: dict, allocation: dict) -> tuple[str, str]:
    """What must agree for a final run and a proxy score to be of the same model."""
    fields = json.dumps([config[k] for k in ("model", "dtype", "data", "quant", "lora")], sort_keys=True)
    return fields, Allocation.from_dict(allocation).key()


def proxy_vs_final(out_dir: Path) -> pd.DataFrame:
    """Each run whose exact setting the search scored at full fidelity, with that proxy score (on the
    search-validation split) beside the final test loss (mean over seeds): did the short proxy
    fine-tune rank them as the full one does?

    A run matches a cached score when model, dtype, data, quantization, LoRA settings and allocation are
    the same and the adapter is plain LoRA (AdaLoRA and LoftQ train differently from the proxy)."""
    proxies = {}
    for path in Path(out_dir).glob("evaluations/*.json"):
        rec = read_json(path)
        if rec["result"]["fidelity"] == "full" and not rec["result"]["failed"]:
            proxies[_setting(rec["config"]["context"], rec["result"]["allocation"])] = rec["result"]["val_loss"]
    rows = []
    for path in sorted(Path(out_dir).glob("runs/*/seed*/result.json")):
        run = read_json(path)
        cfg, res = run["config"], run["result"]
        if cfg["method"]["adapter"] != "lora":
            continue
        proxy = proxies.get(_setting(cfg, res["allocation"]))
        if proxy is not None:
            rows.append({"method": res["method"], "name": res["name"], "proxy_val_loss": proxy,
                         "final_test_loss": res["test_loss"]})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).groupby(["method", "name"], sort=False)
    out = df["proxy_val_loss"].first().to_frame().join(df["final_test_loss"].agg(["mean", "count"]))
    out = out.rename(columns={"mean": "final_test_loss", "count": "seeds"}).reset_index()
    out["proxy_rank"] = out["proxy_val_loss"].rank().astype(int)
    out["final_rank"] = out["final_test_loss"].rank().astype(int)
    return out.sort_values("proxy_val_loss").reset_index(drop=True)


def paper_reference() -> dict:
    """The paper's reported numbers, with their source; shown only as labelled reference."""
    return json.loads(REFERENCE.read_text())
