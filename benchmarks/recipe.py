"""What the speed benchmarks time: a default final run's recipe (the profile's data, batch, length and
schedule) on a 16-bit LoRA model at the profile's budget rank. Imported by the scripts beside it, which
run as files (their folder is then on the import path)."""
from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

from qr_lib.algorithm.allocation import uniform
from qr_lib.algorithm.build import build
from qr_lib.algorithm.memory import model_shapes
from qr_lib.config import Profile, TrainConfig
from qr_lib.data import load_finetune
from qr_lib.models import load_model
from qr_lib.workbook.profiles import load_profile


class Recipe(NamedTuple):
    profile: Profile
    model: object         # the peft model, adapters fresh
    tok: object
    splits: object        # the profile's fine-tuning splits
    train: TrainConfig    # a final run's training settings, cut to the benchmark's steps
    build_s: float        # seconds the build took


def final_run_recipe(profile_name: str, steps: int) -> Recipe:
    profile = load_profile(profile_name)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    splits = load_finetune(profile.data)
    t = time.perf_counter()
    model = build(base, uniform(model_shapes(base).n_blocks, 16, profile.budget_rank), profile.quant, profile.lora,
                  progress=False)
    built = time.perf_counter() - t
    train = dataclasses.replace(profile.finetune.train_config(len(splits.train), 0), steps=steps)
    return Recipe(profile, model, tok, splits, train, built)
