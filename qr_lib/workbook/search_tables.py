"""The search's tables and figures (notebooks 02-04), built from its phase records, computing nothing;
and the search's work (`work`, what estimate.py prices).

One function per notebook section: each saves that section's tables and figures under the layout and
returns what the notebook shows (tables, allocations, readings); a figure saved inside a notebook is
shown there too (store.save_figure).
"""
from __future__ import annotations

import pandas as pd

from ..algorithm.memory import ModelShapes
from ..algorithm.phases import PhaseI, PhaseII, PhaseIII
from ..algorithm.search import SearchResult, front_origins, nsga, phase3_gain
from ..algorithm.search.problem import space_for
from ..config import Profile
from ..errors import QRError
from ..layout import Layout
from ..store import save_figure, save_table
from .methods import Context, load_method
from .plots import (allocation_heatmap, bo_trace, caption, figure_caption, hypervolume_curve, objective_space,
                    sensitivity_plot)
from .work import Work

# The method whose knapsack the final comparison trains (notebook 02 draws it).
KNAPSACK_METHOD = "phase1_knapsack4"
PROXY_COLUMNS = ["objective", "val_loss", "budget_ratio", "avg_bits", "mean_rank"]


def sensitivity_kl(profile: Profile, layout: Layout, result: PhaseI) -> pd.DataFrame:
    """Phase I's KL per block and bit-width: the sensitivity_kl table and figure."""
    table = pd.DataFrame({f"KL @ {b}-bit": v for b, v in result.kl.items()})
    table.insert(0, "block", range(len(table)))
    save_table(table, layout, "sensitivity_kl")
    save_figure(caption(sensitivity_plot(result), f"{figure_caption(profile)} · {result.n_texts} calibration passages"),
                layout, "sensitivity_kl")
    return table


def knapsack(profile: Profile, layout: Layout, result: PhaseI, shapes: ModelShapes) -> dict:
    """What Phase I alone would choose: at the budget's rank, and the knapsack the final runs train (its
    figure, sensitivity_knapsack)."""
    trained = load_method(KNAPSACK_METHOD)
    choice = trained.resolve(Context(profile, shapes, layout))
    save_figure(caption(allocation_heatmap(choice, f"What Phase I alone would choose: {trained.name}"),
                        figure_caption(profile)), layout, "sensitivity_knapsack")
    return {"at_budget_rank": nsga.phase1_choice(profile, space_for(profile, shapes, result)), "knapsack": choice}


def nsga_candidates(layout: Layout, result: PhaseII) -> dict:
    """Every candidate Phase II scored (nsga_evaluations) and the first generation's (nsga_first_generation)."""
    evaluations = pd.DataFrame(result.evaluations + result.promoted)[
        ["generation", "level", "objective", "val_loss", "budget_ratio", "avg_bits", "mean_rank"]]
    save_table(evaluations, layout, "nsga_evaluations")
    scored = pd.DataFrame(result.evaluations)[["key", "objective"]].drop_duplicates("key")
    first = pd.DataFrame(result.first_generation).merge(scored, on="key", how="left")[
        ["origin", "budget_ratio", "objective"]]
    save_table(first, layout, "nsga_first_generation")
    return {"evaluations": evaluations, "first_generation": first}


def nsga_front(profile: Profile, layout: Layout, result: PhaseII) -> pd.DataFrame:
    """The objective space and the hypervolume per generation (figures); returns each generation's front."""
    cap = figure_caption(profile)
    save_figure(caption(objective_space(result), f"{cap} · one proxy seed per point"), layout, "nsga_objective_space")
    save_figure(caption(hypervolume_curve(result), cap), layout, "nsga_hypervolume")
    return pd.DataFrame([{"generation": g["generation"], "front size": len(g["front"]), "hypervolume": g["hv"]}
                         for g in result.generations])


def nsga_agreement(layout: Layout, result: PhaseII) -> pd.DataFrame:
    """Rank agreement of the low and full level (nsga_level_agreement)."""
    agreement = pd.DataFrame([result.level_agreement or {"note": "single level: nothing to compare"}])
    save_table(agreement, layout, "nsga_level_agreement")
    return agreement


def nsga_pareto(layout: Layout, result: PhaseII) -> pd.DataFrame:
    """The Pareto set handed to Phase III (nsga_pareto)."""
    pareto = pd.DataFrame(result.pareto)[PROXY_COLUMNS + ["bits", "ranks"]]
    save_table(pareto, layout, "nsga_pareto")
    return pareto


def _phases(result: SearchResult) -> tuple[PhaseII, PhaseIII]:
    if result.phases is None:
        raise QRError("the search's phase records are missing or damaged; rerun the search (notebook 04 or "
                      "`qr-adaptor search`)")
    return result.phases.nsga, result.phases.bo


def bo_steps(profile: Profile, layout: Layout, result: SearchResult) -> dict:
    """Every BO step (bo_steps), the BO trace and the objective space with Phase III (figures); returns the
    steps and Phase III's own reading (informative or not, and why)."""
    p2, p3 = _phases(result)
    cap = figure_caption(profile)
    steps = pd.DataFrame([{
        "iteration": s["iteration"], "max EI": s.get("max_ei"),
        "objective": s["candidate"]["objective"] if "candidate" in s else None,
        "budget_ratio": s["candidate"]["budget_ratio"] if "candidate" in s else None,
        "utility": s.get("observed_utility"), "GP length scale": s["gp"]["length_scale"] if "gp" in s else None,
        "on a bound": s["gp"]["at_bound"] if "gp" in s else None, "stopped": s.get("stopped", "")} for s in p3.steps])
    save_table(steps, layout, "bo_steps")
    save_figure(caption(bo_trace(p3), cap), layout, "bo_trace")
    save_figure(caption(objective_space(p2, p3), f"{cap} · one proxy seed per point"), layout, "bo_objective_space")
    reading = (("Phase III informed the search: " if p3.informative else "Phase III did NOT inform the search: ")
               + p3.diagnosis)
    return {"steps": steps, "reading": reading}


def selection(profile: Profile, layout: Layout, result: SearchResult) -> pd.DataFrame:
    """Each budget's selected allocation (figures) and what the search cost (search_summary)."""
    cap = figure_caption(profile)
    save_figure(caption(allocation_heatmap(result.selected, "QR-Adaptor: selected allocation"), cap), layout,
                "search_selected_allocation")
    for bits, chosen in result.selected_at.items():
        if float(bits) != profile.budget_bits:
            save_figure(caption(allocation_heatmap(chosen.allocation, f"QR-Adaptor: selected allocation at {bits} bits"),
                                cap), layout, "search_selected_allocation_" + bits.replace(".", "p"))
    cost = pd.DataFrame([{**result.selected_scores, **result.cost}]).T.rename(columns={0: "value"})
    cost.insert(0, "quantity", cost.index)
    save_table(cost, layout, "search_summary")
    return cost


def origins(layout: Layout, result: SearchResult) -> dict:
    """Where the final front came from (search_front_origins) and, per budget, what Phase III changed
    (search_phase3_gain)."""
    p2, p3 = _phases(result)
    front = pd.DataFrame(front_origins(p2, p3))
    save_table(front, layout, "search_front_origins")
    gains = pd.DataFrame([{"bits": bits, **phase3_gain(p2, p3, chosen.max_budget_ratio)}
                          for bits, chosen in result.selected_at.items()]).round(4)
    save_table(gains, layout, "search_phase3_gain")
    return {"front_origins": front, "phase3_gain": gains}


def uniform_reference(profile: Profile, result: PhaseII) -> dict:
    """The full-level row of uniform (budget bits, budget rank): the allocation the budget is defined
    by. Phase II always scores it at the full level (a uniform anchor, or the single level's first
    generation), so it is read from Phase II's rows."""
    for r in result.full_rows():
        if set(r["bits"]) == {profile.budget_bits} and set(r["ranks"]) == {profile.budget_rank}:
            return r
    raise QRError(f"Phase II holds no full-level score of uniform {profile.budget_bits}-bit r{profile.budget_rank}; "
                  "rerun the search (its first generation and anchors always score it)")


def vs_uniform(profile: Profile, layout: Layout, result: SearchResult) -> pd.DataFrame:
    """The selection's proxy scores beside uniform (budget bits, rank) at the same proxy (search_vs_uniform)."""
    ref = uniform_reference(profile, _phases(result)[0])
    vs = pd.DataFrame([{"allocation": "QR-Adaptor (selected)", **{k: result.selected_scores[k] for k in PROXY_COLUMNS}},
                       {"allocation": f"uniform {profile.budget_bits}-bit r{profile.budget_rank}",
                        **{k: ref[k] for k in PROXY_COLUMNS}}])
    save_table(vs, layout, "search_vs_uniform")
    return vs


def work(profile: Profile, space, n_blocks: int) -> dict[str, Work]:
    """Phase I and the proxy candidates of Phases II-III: the first generation (its size depends on the
    ladders and the budget), offspring of later generations, the uniform anchors, promotions and BO
    steps (estimate.py prices them; the algorithm's stages run in notebooks 02-04)."""
    d, cfg = profile.data, profile.nsga
    first = len(nsga.first_generation(profile, space))
    multi = cfg.low_steps > 0
    search_scored = first + (cfg.generations - 1) * cfg.pop_size
    anchors = len(nsga.uniform_anchors(profile, space)) if multi else 0
    full_scored = (anchors + cfg.promote * cfg.generations if multi else search_scored) + profile.bo.iterations
    steps = (search_scored * (cfg.low_steps if multi else profile.proxy.steps)
             + (full_scored * profile.proxy.steps if multi else profile.bo.iterations * profile.proxy.steps))
    low_n = min(cfg.low_n_val, d.n_val) if multi else d.n_val
    built = search_scored + full_scored if multi else search_scored + profile.bo.iterations
    blocks = n_blocks * len(profile.sensitivity.bits)
    # The first generation's size depends on Phase I (duplicates are dropped), so it is counted here
    # with a flat profile: close, not exact.
    return {"Phase I": Work(examples=(blocks + 1) * d.n_calib, model_loads=1, notebooks=1,
                            counts={"block evaluations": blocks}),
            "Phases II-III": Work(steps=steps, models_built=built, model_loads=2, notebooks=2,
                                  examples=search_scored * low_n + full_scored * d.n_val,
                                  counts={"first generation (about)": first,
                                          "search-level candidates": search_scored,
                                          "full-level candidates (at most)": full_scored})}
