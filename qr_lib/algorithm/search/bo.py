"""Phase III: Bayesian refinement around the Phase II Pareto set.

A Gaussian process (Matern nu=5/2: discrete quantization makes a rough landscape) models the
scalarized utility u = a * P_norm - (1 - a) * M_norm of full-level proxy scores, where
P = -proxy objective (validation loss by default) and M = bytes / budget are min-max normalized over
every full-level record (so one Pareto point does not make every utility 0).
Candidates are the feasible one-rung neighbours of the current Pareto points; the Expected
Improvement maximizer is scored by the REAL proxy fine-tune, until `iterations` or max EI < tol.

Every step records the GP's fitted length scale, amplitude and noise. A length scale on its bound,
or a first EI already below the tolerance, means the GP could not model the landscape from these
points; the result then says so (`informative: false` and why) rather than passing its picks off as
refinement. The selection is read off the Pareto set of everything scored: for each budget, the
best proxy objective within it (ties: less memory), so it is never a dominated allocation.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from ...config import Profile
from ...errors import QRError
from ...layout import Layout
from ...store import cached, keyed
from ..phases import PhaseII, PhaseIII
from ..proxy import ProxyEvaluator, full_level
from .problem import SearchSpace, pareto_set


def features(space: SearchSpace, genes) -> np.ndarray:
    """Ladder indices scaled to [0, 1], plus bytes / budget: memory is half of the utility, and
    the per-block genes alone make the GP learn that sum from few points."""
    g = np.asarray(genes, dtype=float)
    return np.append(g / np.maximum(space.upper, 1), space.bytes(genes) / space.budget)


def utility(records: list[dict], reference: list[dict], alpha: float) -> np.ndarray:
    """a * P_norm - (1 - a) * M_norm, both min-max normalized over `reference` (all observed records)."""
    p = -np.array([r["objective"] for r in records])
    m = np.array([r["budget_ratio"] for r in records])
    fp = -np.array([r["objective"] for r in reference])
    fm = np.array([r["budget_ratio"] for r in reference])

    def norm(x, ref):
        span = ref.max() - ref.min()
        return (x - ref.min()) / span if span > 0 else np.zeros_like(x)
    return alpha * norm(p, fp) - (1 - alpha) * norm(m, fm)


def neighbours(space: SearchSpace, genes) -> list[np.ndarray]:
    """Every allocation one rung (bits or rank, one block) away that fits the budget."""
    out = []
    for gene in range(len(genes)):
        for step in (-1, 1):
            g = np.array(genes, dtype=int)
            g[gene] += step
            if 0 <= g[gene] <= space.upper[gene] and space.bytes(g) <= space.budget:
                out.append(g)
    return out


def _gp(seed: int):
    """y is standardized, so the amplitude stays near 1; one length scale over all features,
    since a handful of observations cannot fit one per dimension."""
    from skopt.learning import GaussianProcessRegressor
    from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern

    kernel = ConstantKernel(1.0, (0.1, 10.0)) * Matern(length_scale=1.0, length_scale_bounds=(0.05, 20.0), nu=2.5)
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, noise="gaussian",
                                    n_restarts_optimizer=2, random_state=seed)


def fitted(gp) -> dict:
    """The GP's fitted hyperparameters, and whether the length scale sits on a bound (within 1%)."""
    p = gp.kernel_.get_params()
    ls, (lo, hi) = float(p["k1__k2__length_scale"]), p["k1__k2__length_scale_bounds"]
    return {"length_scale": ls, "length_scale_bounds": [lo, hi],
            "at_bound": bool(ls <= lo * 1.01 or ls >= hi / 1.01),
            "amplitude": float(p["k1__k1__constant_value"]), "noise": float(p["k2__noise_level"])}


def select(records: list[dict], max_ratio: float = 1.0) -> dict | None:
    """The best proxy objective among feasible records within `max_ratio` x the budget (ties: less
    memory): never dominated by another record."""
    ok = [r for r in records if r["budget_ratio"] <= max_ratio + 1e-12 and not r.get("failed")]
    return min(ok, key=lambda r: (r["objective"], r["budget_ratio"])) if ok else None


def diagnosis(steps: list[dict], ei_tol: float) -> tuple[bool, str]:
    """Could the GP model the landscape? (informative, why)."""
    fits = [s["gp"] for s in steps if "gp" in s]
    if not fits:
        return False, "no GP was fitted (no candidate left to model)"
    if steps[0].get("max_ei", 0.0) < ei_tol:
        return False, f"the first maximum EI ({steps[0]['max_ei']:.2g}) was already below the tolerance {ei_tol:g}"
    if all(f["at_bound"] for f in fits):
        return False, (f"the fitted length scale sat on its bound at every step ({fits[-1]['length_scale']:.3g}): "
                       "the GP found no smooth structure in these points, so EI ranks candidates by chance")
    return True, "the GP fitted a length scale inside its bounds"


def refine(profile: Profile, evaluator: ProxyEvaluator, space: SearchSpace, phase2: PhaseII,
           progress: bool = True) -> PhaseIII:
    from skopt.acquisition import gaussian_ei

    cfg, full = profile.bo, full_level(profile)
    front = phase2.pareto
    if not front:
        raise QRError("Phase II produced no feasible full-level candidate to refine; raise "
                      "nsga.generations or nsga.promote, or check the proxy for divergence")
    observed = phase2.full_rows()
    steps, t0 = [], time.time()
    for it in range(1, cfg.iterations + 1):
        pareto = pareto_set(observed)
        seen = {tuple(space.genes(r)) for r in observed}
        pool = {tuple(g): g for r in pareto for g in neighbours(space, space.genes(r)) if tuple(g) not in seen}
        if not pool:
            steps.append({"iteration": it, "stopped": "no unevaluated feasible neighbour left"})
            break
        candidates = list(pool.values())
        X = np.array([features(space, space.genes(r)) for r in observed])
        y = -utility(observed, observed, cfg.alpha)  # skopt minimizes
        gp = _gp(cfg.seed)
        with warnings.catch_warnings():  # few points in many dimensions: length scales hit bounds
            warnings.simplefilter("ignore")
            gp.fit(X, y)
            ei = gaussian_ei(np.array([features(space, g) for g in candidates]), gp, y_opt=y.min(), xi=cfg.xi)
        best = int(np.argmax(ei))
        if ei[best] < cfg.ei_tol:
            steps.append({"iteration": it, "max_ei": float(ei[best]), "gp": fitted(gp),
                          "stopped": f"max EI < {cfg.ei_tol}"})
            break
        rec = evaluator.evaluate(space.allocation(candidates[best]), full).summary()
        observed.append(rec)
        steps.append({"iteration": it, "n_candidates": len(candidates), "max_ei": float(ei[best]),
                      "gp": fitted(gp), "candidate": rec,
                      "observed_utility": float(utility([rec], observed, cfg.alpha)[0])})
        if progress:
            print(f"BO {it}/{cfg.iterations}: EI {ei[best]:.4f}, objective {rec['objective']:.4f}, "
                  f"memory {rec['budget_ratio']:.3f} x budget")
    ok = [r for r in observed if r["budget_ratio"] <= 1 + 1e-12]
    u = utility(ok, ok, cfg.alpha)
    informative, why = diagnosis(steps, cfg.ei_tol)
    return PhaseIII(steps=steps, selected=select(ok), observed=[{**r, "utility": float(x)} for r, x in zip(ok, u)],
                    pareto=pareto_set(observed), alpha=cfg.alpha, informative=informative, diagnosis=why,
                    train_tokens=sum(s["candidate"]["train_tokens"] for s in steps if "candidate" in s),
                    wall_seconds=round(time.time() - t0, 1))


def config(profile: Profile, nsga_key: str) -> dict:
    """What Phase III's result depends on, beyond Phase II's (cited by its key)."""
    return keyed({"bo": profile.bo, "proxy": profile.proxy, "phase2_key": nsga_key})


def run(profile: Profile, layout: Layout, evaluator: ProxyEvaluator, space: SearchSpace, phase2: PhaseII,
        nsga_key: str, progress: bool = True) -> PhaseIII:
    """Phase III for a profile; reuses the layout's bo.json while its config matches."""
    return PhaseIII.from_dict(cached(layout.bo, config(profile, nsga_key),
                                     lambda: refine(profile, evaluator, space, phase2, progress)))
