"""The fidelity-plasticity explorer behind notebook 08: pick (bits, rank) per block group and see
what it costs, how fragile those blocks are (Phase I), what the measured learning curves predict for it
(so rank has an effect), and how the nearest allocations the search actually fine-tuned scored, with a
flag where the nearest is far. Reads artifacts only; nothing here trains.
"""
from __future__ import annotations

import numpy as np

from ..algorithm.allocation import Allocation
from ..algorithm.memory import formula_bytes, model_shapes, profile_budget
from ..algorithm.phases import PhaseI
from ..algorithm.proxy import Evaluation, stored_evaluations
from ..algorithm.search.problem import kl_by_rung
from ..config import Profile
from ..errors import QRError
from ..layout import Layout
from ..models import load_skeleton
from ..progress import headless
from ..store import stored_result
from . import sizing
from .methods import load_method
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
        self.kl = kl_by_rung(PhaseI.from_dict(phase1).kl, profile.bit_ladder, n)
        self.length = profile.finetune.train_config(profile.data.n_train, profile.finetune.seeds[0]).steps
        self.reference, self.gaps = self._uniform_gaps()
        # A neighbour more rungs away than this says little of the allocation (a setting: half the
        # blocks one rung off).
        self.far = n // 2
        self.records = self._records()
        # Why none may match: the results were made with other settings (a dtype, a --set).
        self.other_settings = [] if self.records else other_settings(profile, layout)

    def _records(self) -> list[Evaluation]:
        """Every proxy score of this profile's proxy (same model, data, quantizer and libraries), with
        its proxy level (never compared across levels), on this profile's ladders."""
        return [r for r in stored_evaluations(self.layout, self.profile)
                if set(r.allocation.bits) <= set(self.profile.bit_ladder)
                and set(r.allocation.ranks) <= set(self.profile.rank_ladder)]

    def _uniform_gaps(self) -> tuple[float | None, dict]:
        """16-bit LoRA's dev loss and each uniform (bits, rank) setting's gap to it at the final fine-tune's
        length, read from the learning curves (`make sizing`) of the settings that quantize as this profile
        does (no quantizer overrides); (None, {}) where there are none."""
        curves = sizing.curves(self.layout)
        if not curves:
            return None, {}
        table = sizing.table(curves)
        at = table[table["step"] == min(table["step"].unique(), key=lambda s: abs(s - self.length))]
        own = [m for m in at["method"] if not load_method(m).quant]
        at = at[at["method"].isin(own) & ((at["quantizer"] == self.profile.quant.backend) | (at["bits"] == 16))]
        ref = at.loc[at["bits"] == 16, "dev_loss"]
        return (float(ref.iloc[0]) if len(ref) else None,
                {(int(r["bits"]), int(r["rank"])): float(r["minus_lora16"]) for _, r in at.iterrows() if r["bits"] != 16})

    def _gap(self, bits: int, rank: int, notes: set) -> float:
        """One uniform setting's gap: measured, or interpolated in log2(rank) between measured ranks at
        those bits (the nearest rank outside them), or scaled from the nearest measured bits by Phase I's
        total KL; `notes` collects what was not measured."""
        if bits == 16:
            return 0.0
        measured = sorted({b for b, _ in self.gaps})
        near = min(measured, key=lambda b: abs(b - bits))
        scale = 1.0
        if near != bits:
            lo, hi = (self.profile.bit_ladder.index(b) for b in (bits, near))
            scale = float(self.kl[:, lo].sum() / self.kl[:, hi].sum())
            notes.add(f"{bits} bits has no curve: {near} bits' gap scaled by Phase I's KL ({scale:.3f}x)")
        ranks = sorted(r for b, r in self.gaps if b == near)
        if rank in ranks:
            return scale * self.gaps[(near, rank)]
        below, above = [r for r in ranks if r < rank], [r for r in ranks if r > rank]
        if not below or not above:
            used = (below or above)[-1 if below else 0]
            notes.add(f"rank {rank} at {near} bits is outside the measured ranks {ranks}: rank {used}'s gap used")
            return scale * self.gaps[(near, used)]
        r0, r1 = below[-1], above[0]
        t = (np.log2(rank) - np.log2(r0)) / (np.log2(r1) - np.log2(r0))
        notes.add(f"rank {rank} at {near} bits interpolated between ranks {r0} and {r1}")
        return scale * ((1 - t) * self.gaps[(near, r0)] + t * self.gaps[(near, r1)])

    def predict(self, allocation: Allocation) -> dict | None:
        """The dev loss the learning curves predict: 16-bit LoRA's plus each block's share of its
        (bits, rank) setting's uniform gap, the share being that block's part of Phase I's KL at those
        bits (a uniform allocation gets its measured gap back). None without learning curves."""
        if self.reference is None or not self.gaps:
            return None
        notes: set = set()
        gap = 0.0
        for i, (b, r) in enumerate(allocation.pairs()):
            if b == 16:
                continue
            j = self.profile.bit_ladder.index(b)
            gap += float(self.kl[i, j] / self.kl[:, j].sum()) * self._gap(b, r, notes)
        return {"dev_loss": self.reference + gap, "gap": gap, "steps": self.length, "notes": sorted(notes)}

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
        # Nearest first; at equal distance the full proxy's score before the cheap one.
        nearest = sorted(self.records, key=lambda r: (np.abs(self._genes(r.allocation) - g).sum(),
                                                      r.level != "full"))[:k]
        return {
            "memory_MiB": mem["blocks"] / 2**20, "budget_ratio": mem["blocks"] / self.budget,
            "avg_bits": mem["avg_bits"], "mean_rank": allocation.mean_rank(),
            "predicted_kl": predicted, "from_curves": self.predict(allocation),
            "group_sensitivity": [float(self.kl[blocks, 0].mean()) for blocks in self.groups],
            "nearest": [{"distance": int(np.abs(self._genes(r.allocation) - g).sum()),
                         "level": r.level, "objective": r.objective, "val_loss": r.val_loss,
                         "metric": r.metric, "budget_ratio": r.budget_ratio,
                         "avg_bits": r.avg_bits,
                         "far": int(np.abs(self._genes(r.allocation) - g).sum()) > self.far} for r in nearest],
        }

    def widget(self):
        """Sliders per block group; the summary and the allocation heatmap redraw on every change. Run
        headless (`make reproduce`), it shows the reading of the budget's uniform allocation instead: no
        one can move a slider there, the executed copy keeps no widget, and papermill has been seen to wait
        forever on a kernel that had finished this cell with an Output widget in it."""
        if headless():
            bits, rank = self.profile.budget_bits, self.profile.budget_rank
            self.report(self.allocation([bits] * len(self.groups), [rank] * len(self.groups)))
            return None
        import ipywidgets as W

        out = W.Output()
        sliders = []
        for k, blocks in enumerate(self.groups):
            label = f"blocks {blocks[0]}-{blocks[-1]}"
            wide = {"description_width": "initial"}          # the block range readable, not cut
            sliders.append((W.SelectionSlider(options=list(self.profile.bit_ladder), value=self.profile.budget_bits,
                                              description=f"{label} bits", style=wide),
                            W.SelectionSlider(options=list(self.profile.rank_ladder), value=self.profile.budget_rank,
                                              description=f"{label} rank", style=wide)))

        def redraw(_=None):
            with out:
                out.clear_output(wait=True)
                self.report(self.allocation([b.value for b, _ in sliders], [r.value for _, r in sliders]))

        for b, r in sliders:
            b.observe(redraw, names="value")
            r.observe(redraw, names="value")
        redraw()
        return W.VBox([W.HBox([b, r]) for b, r in sliders] + [out])

    def report(self, alloc) -> None:
        """What the explorer says of one allocation: memory, predicted fidelity loss and dev loss, each
        group's sensitivity, the nearest allocations the search fine-tuned, and its heatmap."""
        d = self.describe(alloc)
        verdict = "fits" if d["budget_ratio"] <= 1 else "OVER the budget"
        print(f"memory {d['memory_MiB']:.1f} MiB = {d['budget_ratio']:.3f} x budget ({verdict}); "
              f"{d['avg_bits']:.2f} average bits, mean rank {d['mean_rank']:.1f}")
        print(f"predicted fidelity loss (sum of Phase I KL at these bits): {d['predicted_kl']:.4f}")
        if (c := d["from_curves"]) is not None:
            print(f"predicted dev loss after {c['steps']} steps (learning curves): {c['dev_loss']:.3f}, "
                  f"{c['gap']:+.3f} nats against 16-bit LoRA")
            for note in c["notes"]:
                print(f"  ({note})")
        for blocks, s in zip(self.groups, d["group_sensitivity"]):
            print(f"  blocks {blocks[0]}-{blocks[-1]}: mean KL at {self.profile.bit_ladder[0]} bits {s:.4f}")
        print("nearest allocations the search fine-tuned:")
        for n in d["nearest"]:
            print(f"  {n['distance']} rungs away: {n['metric']} objective {n['objective']:.4f} ({n['level']} proxy), "
                  f"{n['budget_ratio']:.3f} x budget"
                  + (f"  FAR: more than {self.far} rungs from yours, it says little about it" if n["far"] else ""))
        show(allocation_heatmap(alloc, "your allocation"))
