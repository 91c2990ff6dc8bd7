"""The proxy check: does the search's short proxy fine-tune rank allocations as the final recipe does?

The search trusts a proxy (a few LoRA steps, a loss on the search-validation split) to stand in for
the final fine-tune. This study measures that trust on allocations spanning the front, each of which
also has a final run (the methods in `ProxyCheckConfig.methods`: uniform ones, the searched ones at
each budget, random ones): for every allocation and proxy seed, one proxy run of max(lengths) steps,
scored per example at each length in `lengths` (0 = the quantized model before any training). With a
constant rate after warm-up (the default proxy's schedule) the score at length L is exactly what a
proxy of L steps computes, so one run gives every length; per-example losses give every n_val (the
first n examples) at no cost.

For each (length, n_val): Spearman and Kendall between the proxy (mean over proxy seeds) and the final
runs' loss on the dev split (mean over their seeds; a split neither the proxy nor the test table reads),
over all allocations and over the `top_k` best by final loss (the close decisions the search makes near
its front), how many pairs of allocations are close (final losses less than 3x the proxy's seed noise
apart) and how many of those the proxy orders right, and the proxy's seed-to-seed noise against the
spread between allocations. The recommendation is the cheapest setting with Spearman >=
`min_spearman` over both, or, if none reaches it, the best one, said plainly.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr

from ..algorithm.allocation import Allocation
from ..algorithm.build import build
from ..algorithm.runner import SERIAL, Runner, each
from ..algorithm.train import example_losses, train
from ..config import ProxyCheckConfig, Profile
from ..data import load_finetune
from ..errors import QRError
from ..layout import Layout
from ..models import worker_model
from ..store import cached, content_hash, save_figure, save_table, write_artifact
from .finetune import plan, results
from .methods import load_method
from .work import Work
from .plots import proxy_check_plot, caption, figure_caption


def final_losses(layout: Layout, methods) -> pd.DataFrame:
    """Each distinct allocation's final loss on the dev split (mean over its finished seeds that scored it,
    finetune.dev_seeds; never the test split, which only the final table reads), under the first method
    that has it; `same_as` names the others (a search that selects a uniform allocation makes two
    methods one allocation, which a rank correlation must count once)."""
    rows = []
    for m in methods:
        res = results(layout, m)
        if not res:
            continue
        pairs = res[0].allocation.pairs()  # the allocation, not its name
        same = [r for r in rows if Allocation.from_dict(r["allocation"]).pairs() == pairs]
        if same:
            same[0]["same_as"].append(m)
            continue
        scored = [r for r in res if r.dev_loss is not None]    # the seeds of finetune.dev_seeds
        if not scored:
            raise QRError(f"the final runs of {m} have no dev-split score, which the proxy check compares the "
                          "proxy with (it never reads the test split); set data.n_dev (e.g. 256) and "
                          "finetune.dev_seeds (e.g. [0]) and rerun them")
        rows.append({"method": m, "name": res[0].name, "allocation": res[0].allocation.to_dict(), "same_as": [],
                     "avg_bits": res[0].avg_bits, "memory_MiB": res[0].memory_bytes / 2**20,
                     "final_dev_loss": float(np.mean([r.dev_loss for r in scored])), "final_seeds": len(scored)})
    return pd.DataFrame(rows)


def proxy_curve(profile: Profile, allocation, seed: int, cfg: ProxyCheckConfig, base, tok, train_set, val) -> dict:
    """length -> per-example (summed NLL, tokens) on `val`, from one proxy run of max(lengths) steps."""
    tcfg = dataclasses.replace(profile.proxy, steps=max(cfg.lengths), seed=seed)
    model = build(base, allocation, profile.quant, profile.lora, progress=False, seed=seed)
    curve = {}
    if 0 in cfg.lengths:
        curve[0] = example_losses(model, tok, val, tcfg.max_len)

    def checkpoint(step):
        if step + 1 in cfg.lengths:
            curve[step + 1] = example_losses(model, tok, val, tcfg.max_len)
            model.train()
    log = train(model, tok, train_set, tcfg, progress=False, on_step=checkpoint)
    if log["diverged"]:
        raise QRError(f"the proxy-check proxy of {allocation.name} diverged at seed {seed}; lower proxy.lr")
    return curve


def _context(profile: Profile) -> dict:
    cfg = profile.proxy_check
    return {"model": profile.model, "dtype": profile.dtype, "quant": profile.quant, "lora": profile.lora,
            "data": profile.data, "proxy": profile.proxy, "lengths": cfg.lengths, "n_val": max(cfg.n_val)}


def curve(profile: Profile, layout: Layout, allocation: dict, seed: int, base, tok) -> dict:
    """One allocation's proxy curve at one proxy seed: its artifact under the layout's proxy_check/,
    read back when there (the stage protocol)."""
    cfg, context = profile.proxy_check, _context(profile)
    alloc = Allocation.from_dict(allocation)
    key = content_hash({"context": context, "allocation": alloc.text(), "seed": seed})

    def compute():
        splits = load_finetune(profile.data)
        t = time.time()
        got = proxy_curve(profile, alloc, seed, cfg, base, tok, splits.train, splits.val[:max(cfg.n_val)])
        return {"curve": {str(k): v for k, v in got.items()}, "seconds": round(time.time() - t, 1)}
    return cached(layout.proxy_check_curve(key), {**context, "allocation": alloc.to_dict(), "seed": seed},
                  compute)["curve"]


def curve_on_worker(profile: Profile, layout: Layout, allocation: dict, seed: int) -> None:
    """On a runner's worker: one proxy curve, written as its artifact (the caller reads it back)."""
    curve(profile, layout, allocation, seed, *worker_model(profile.model, profile.dtype, profile.device))


def work(profile: Profile) -> Work:
    """The proxy check's curves: each of its methods with a planned final run, at every proxy
    seed, trained to the longest length and scored at each (two methods of one allocation count twice)."""
    check, planned = profile.proxy_check, {m.id for m, _ in plan(profile)}
    curves = len([m for m in check.methods if m in planned]) * len(check.seeds)
    return Work(steps=curves * max(check.lengths), models_built=curves, model_loads=1, notebooks=1,
                examples=curves * len(check.lengths) * max(check.n_val), counts={"runs (at most)": curves})


def run(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL, progress: bool = True) -> dict:
    """Score every proxy-check allocation's proxy curve through the runner (an artifact per allocation
    and seed) and write proxy_check.json."""
    cfg = profile.proxy_check
    if profile.proxy.schedule != "constant":
        raise QRError(f"proxy.schedule is {profile.proxy.schedule!r}; the proxy check scores one run at several "
                      "lengths, which equals separate proxies only with proxy.schedule = 'constant'")
    other = [m for m in cfg.methods if load_method(m).quant or load_method(m).adapter != "lora"]
    if other:
        raise QRError(f"proxy-check methods {other} use another quantizer or adapter than the search's proxy; "
                      "check it on methods the search could have chosen (HQQ allocations, plain LoRA)")
    finals = final_losses(layout, cfg.methods)
    if len(finals) < 3:
        raise QRError(f"only {len(finals)} of the proxy-check methods {list(cfg.methods)} have final runs; run "
                      "notebook 05 (or `qr-adaptor finetune`) for them first")
    t0 = time.time()
    todo = [(row, s) for _, row in finals.iterrows() for s in cfg.seeds]
    curves = each(runner, "proxy check", [(profile, layout, row["allocation"], s) for row, s in todo], curve_on_worker,
                  lambda *call: curve(*call, base, tok), [f"{row['name']}, proxy seed {s}" for row, s in todo], progress)
    scores = []
    for (row, seed), got in zip(todo, curves):
        for length, per_example in got.items():
            nll = np.array([x for x, _ in per_example])
            tokens = np.array([n for _, n in per_example])
            for n in cfg.n_val:
                scores.append({"method": row["method"], "seed": seed, "length": int(length), "n_val": n,
                               "proxy_loss": float(nll[:n].sum() / tokens[:n].sum())})
    result = {"finals": finals.drop(columns="allocation").to_dict("records"), "scores": scores,
              "wall_seconds": round(time.time() - t0, 1)}
    result["table"] = summary(pd.DataFrame(scores), finals, profile.proxy.batch_size, cfg.top_k).to_dict("records")
    result["recommendation"] = recommend(pd.DataFrame(result["table"]), cfg.min_spearman)
    write_artifact(layout.proxy_check, {"proxy_check": cfg, "context": _context(profile)}, result)
    return result


def summary(scores: pd.DataFrame, finals: pd.DataFrame, batch_size: int, top_k: int = 5) -> pd.DataFrame:
    """Per (length, n_val): rank agreement with the final dev loss (all allocations, and the top_k
    by final loss), and noise against signal."""
    final = finals.set_index("method")["final_dev_loss"]
    rows = []
    for (length, n_val), g in scores.groupby(["length", "n_val"]):
        per_seed = g.pivot_table(index="method", columns="seed", values="proxy_loss")
        proxy = per_seed.mean(axis=1)
        y = final.loc[proxy.index]
        noise = float(per_seed.std(axis=1, ddof=1).mean()) if per_seed.shape[1] > 1 else float("nan")
        top = y.nsmallest(top_k).index
        # Close pairs: allocations whose final losses differ by less than 3x the proxy's seed noise, the
        # decisions a proxy can get wrong; how many there are says what a rank correlation rests on.
        close = [(a, b) for i, a in enumerate(y.index) for b in y.index[i + 1:]
                 if noise == noise and abs(y[a] - y[b]) < 3 * noise]
        agree = [np.sign(proxy[a] - proxy[b]) == np.sign(y[a] - y[b]) for a, b in close]
        rows.append({"length": int(length), "n_val": int(n_val), "allocations": len(proxy),
                     "spearman": float(spearmanr(proxy, y)[0]), "kendall": float(kendalltau(proxy, y)[0]),
                     "top_k": len(top), "spearman_top": float(spearmanr(proxy[top], y[top])[0]),
                     "kendall_top": float(kendalltau(proxy[top], y[top])[0]),
                     "close_pairs": len(close), "pairs": len(y) * (len(y) - 1) // 2,
                     "close_pairs_ordered_right": int(sum(agree)),
                     "seed_noise": noise, "allocation_spread": float(proxy.std(ddof=1)),
                     "signal_to_noise": float(proxy.std(ddof=1) / noise) if noise and noise > 0 else float("nan"),
                     # what one proxy score costs, in training examples plus examples scored
                     "cost_examples": int(length) * batch_size + int(n_val)})
    return pd.DataFrame(rows).sort_values(["length", "n_val"]).reset_index(drop=True)


def recommend(table: pd.DataFrame, min_spearman: float) -> dict:
    """The cheapest (length, n_val) whose Spearman reaches `min_spearman` over all allocations and over
    the top_k (where the table has it: a proxy that only separates far allocations cannot make the
    search's decisions); else the best one, with what that means for the search."""
    good = table["spearman"] >= min_spearman
    if "spearman_top" in table:
        good &= table["spearman_top"] >= min_spearman
    ok = table[good].sort_values(["cost_examples", "length"])
    if len(ok):
        best = ok.iloc[0]
        return {"length": int(best["length"]), "n_val": int(best["n_val"]), "spearman": float(best["spearman"]),
                "reaches": True,
                "statement": f"the cheapest proxy that ranks allocations as the final fine-tune does (Spearman "
                             f"{best['spearman']:.2f}"
                             + (f", {best['spearman_top']:.2f} among the best {int(best['top_k'])}" if "spearman_top" in best else "")
                             + f"; >= {min_spearman}) is {int(best['length'])} steps scored on "
                             f"{int(best['n_val'])} validation pairs"}
    # Judged on what failed: the weaker of the two correlations (the top_k one where there is one).
    weakest = table[["spearman", "spearman_top"]].min(axis=1) if "spearman_top" in table else table["spearman"]
    best = table.assign(weakest=weakest).sort_values(["weakest", "cost_examples"], ascending=[False, True]).iloc[0]
    top = (f" and {best['spearman_top']:.2f} among the best {int(best['top_k'])}" if "spearman_top" in best else "")
    failed = ("among the best " + str(int(best["top_k"])) if "spearman_top" in best and
              best["spearman_top"] < min_spearman else "over all allocations")
    return {"length": int(best["length"]), "n_val": int(best["n_val"]), "spearman": float(best["spearman"]),
            "reaches": False,
            "statement": f"no proxy setting reaches Spearman {min_spearman} both over all allocations and among the "
                         f"best (it fails {failed}); the best, {int(best['length'])} steps on {int(best['n_val'])} "
                         f"pairs, reaches {best['spearman']:.2f} over all allocations{top}: the search ranks "
                         "allocations by a score that often disagrees with the final fine-tune near its front, so its "
                         "selection is a guess the final comparison must check, not an optimum"}


def save(profile: Profile, layout: Layout, result: dict) -> dict:
    """The proxy check's table and figure (proxy_check) from run()'s result, and what it says of the
    profile's own proxy: the recommendation, and Phase III's gain at each budget (search_phase3_gain,
    where the search has run) against the proxy's seed noise at the profile's setting."""
    table = pd.DataFrame(result["table"])
    save_table(table.round(4), layout, "proxy_check")
    save_figure(caption(proxy_check_plot(result, profile.proxy.steps, profile.data.n_val),
                        f"{figure_caption(profile)} · right: the search proxy ({profile.proxy.steps} steps) · bars: "
                        "range over proxy seeds"), layout, "proxy_check")
    said = [f"profile proxy: {profile.proxy.steps} steps on {profile.data.n_val} pairs; recommendation: "
            f"{result['recommendation']['statement']}"]
    here = table[(table["length"] == profile.proxy.steps) & (table["n_val"] == profile.data.n_val)]
    gains = layout.table("search_phase3_gain", ".csv")
    if len(here) and gains.exists():
        noise = float(here["seed_noise"].iloc[0])
        said += [f"Phase III at {g['bits']} bits: gain {g['gain']:+.4f} against a proxy seed noise of {noise:.4f} "
                 + ("(within the noise)" if abs(g["gain"]) < noise else "(beyond the noise)")
                 for _, g in pd.read_csv(gains).iterrows()]
    return {"table": table, "readings": said}
