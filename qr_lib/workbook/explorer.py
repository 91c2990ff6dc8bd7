"""The fidelity-plasticity explorer behind notebook 08: pick (bits, rank) per block group and see
what it costs, how fragile those blocks are (Phase I), and how the nearest allocations the search
actually fine-tuned scored. Reads artifacts only; nothing here trains.
"""
from __future__ import annotations

import numpy as np

from ..algorithm.allocation import Allocation
from ..algorithm.memory import formula_bytes, model_shapes, profile_budget
from ..algorithm.proxy import Evaluation, proxy_context
from ..algorithm.search.problem import kl_by_rung
from ..config import Profile
from ..errors import QRError
from ..layout import Layout
from ..models import load_skeleton
from ..store import LEFT_OUT, content_hash, read_artifact, stored_result
from .plots import allocation_heatmap, show
from .profiles import other_settings


class Explorer:
    def __init__(self, profile: Profile, layout: Layout, n_groups: int = 3, base=None):
        base = base if base is not None else load_skeleton(profile.model)  # shapes only: no weights are read
        self.profile, self.layout = profile, layout
        self.shapes = model_shapes(base)
        self.budget = profile_budget(profile, self.shapes)
        n = self.shapes.n_blocks
        self.groups = [list(g) for g in np.array_split(np.arange(n), n_groups)]
        phase1 = stored_result(layout.sensitivity)
        if phase1 is None:
            raise QRError(f"{layout.sensitivity} is missing or damaged; run Phase I first (notebook 02 or "
                          f"`qr-adaptor sensitivity --profile {profile.name}`)")
        self.kl = kl_by_rung(phase1["kl"], profile.bit_ladder, n)
        self.records = self._records()
        # Why none may match: the results were made with other settings (a dtype, a --set).
        self.other_settings = [] if self.records else other_settings(profile, layout)

    def _records(self) -> list[Evaluation]:
        """Every proxy score of this profile's proxy (same model, data, quantizer and libraries), with
        its fidelity (never compared across fidelities), on this profile's ladders."""
        context_key = content_hash(proxy_context(self.profile))
        out = []
        for path in sorted(self.layout.evaluations.glob("*.json")):
            rec = read_artifact(path, then=LEFT_OUT)
            if rec is None or rec["config"].get("context_key") != context_key:
                continue
            r = Evaluation.from_dict(rec["result"])
            if set(r.allocation.bits) <= set(self.profile.bit_ladder) and \
                    set(r.allocation.ranks) <= set(self.profile.rank_ladder):
                out.append(r)
        return out

    def summary(self) -> str:
        """What the explorer found, and where it found nothing of this profile's, why."""
        groups = [f"{g[0]}-{g[-1]}" for g in self.groups]
        text = f"{len(self.records)} evaluated allocations in the cache; groups: {groups}"
        if self.other_settings:
            text += (f"\nthe results under {self.layout.root} were made with other settings: "
                     f"{'; '.join(self.other_settings)}. Load the profile with theirs to read them "
                     "(e.g. OVERRIDES = {'dtype': 'float32'} in the parameters cell, or --set dtype=float32).")
        return text

    def allocation(self, group_bits, group_ranks) -> Allocation:
        bits, ranks = [0] * self.shapes.n_blocks, [0] * self.shapes.n_blocks
        for blocks, b, r in zip(self.groups, group_bits, group_ranks):
            for i in blocks:
                bits[i], ranks[i] = b, r
        return Allocation(bits, ranks, self.profile.bit_ladder, self.profile.rank_ladder)

    def _genes(self, allocation: Allocation) -> np.ndarray:
        return np.array(Allocation(allocation.bits, allocation.ranks, self.profile.bit_ladder,
                                   self.profile.rank_ladder).to_genes())

    def describe(self, allocation: Allocation, k: int = 3) -> dict:
        mem = formula_bytes(self.shapes, allocation, self.profile.quant)
        rungs = [self.profile.bit_ladder.index(b) for b in allocation.bits]
        predicted = float(sum(self.kl[i, j] for i, j in enumerate(rungs)))
        g = np.array(allocation.to_genes())
        # Nearest first; at equal distance the full-fidelity score before the cheap one.
        nearest = sorted(self.records, key=lambda r: (np.abs(self._genes(r.allocation) - g).sum(),
                                                      r.fidelity != "full"))[:k]
        return {
            "memory_MiB": mem["blocks"] / 2**20, "budget_ratio": mem["blocks"] / self.budget,
            "avg_bits": mem["avg_bits"], "mean_rank": allocation.mean_rank(),
            "predicted_kl": predicted,
            "group_sensitivity": [float(self.kl[blocks, 0].mean()) for blocks in self.groups],
            "nearest": [{"distance": int(np.abs(self._genes(r.allocation) - g).sum()),
                         "fidelity": r.fidelity, "objective": r.objective, "val_loss": r.val_loss,
                         "metric": r.metric, "budget_ratio": r.budget_ratio,
                         "avg_bits": r.avg_bits} for r in nearest],
        }

    def widget(self):
        """Sliders per block group; the summary and the allocation heatmap redraw on every change."""
        import ipywidgets as W

        out = W.Output()
        sliders = []
        for k, blocks in enumerate(self.groups):
            label = f"blocks {blocks[0]}-{blocks[-1]}"
            sliders.append((W.SelectionSlider(options=list(self.profile.bit_ladder), value=self.profile.budget_bits,
                                              description=f"{label} bits"),
                            W.SelectionSlider(options=list(self.profile.rank_ladder), value=self.profile.budget_rank,
                                              description=f"{label} rank")))

        def redraw(_=None):
            alloc = self.allocation([b.value for b, _ in sliders], [r.value for _, r in sliders])
            d = self.describe(alloc)
            with out:
                out.clear_output(wait=True)
                verdict = "fits" if d["budget_ratio"] <= 1 else "OVER the budget"
                print(f"memory {d['memory_MiB']:.1f} MiB = {d['budget_ratio']:.3f} x budget ({verdict}); "
                      f"{d['avg_bits']:.2f} average bits, mean rank {d['mean_rank']:.1f}")
                print(f"predicted fidelity loss (sum of Phase I KL at these bits): {d['predicted_kl']:.4f}")
                for blocks, s in zip(self.groups, d["group_sensitivity"]):
                    print(f"  blocks {blocks[0]}-{blocks[-1]}: mean KL at {self.profile.bit_ladder[0]} bits {s:.4f}")
                print("nearest allocations the search fine-tuned:")
                for n in d["nearest"]:
                    print(f"  {n['distance']} rungs away: {n['metric']} objective {n['objective']:.4f} ({n['fidelity']} fidelity), "
                          f"{n['budget_ratio']:.3f} x budget")
                show(allocation_heatmap(alloc, "your allocation"))

        for b, r in sliders:
            b.observe(redraw, names="value")
            r.observe(redraw, names="value")
        redraw()
        return W.VBox([W.HBox([b, r]) for b, r in sliders] + [out])
