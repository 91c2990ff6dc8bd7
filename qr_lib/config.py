"""Profiles as data: one frozen dataclass per stage, grouped in a Profile.

`smoke` is a tiny in-process model (tests, CI, minutes), `default` the embedded SmolLM2-135M on
2 CPU cores, `paper` the paper's scale on a GPU. A profile is a JSON file under profiles/ that
overrides the dataclass defaults; `overrides` like {"proxy.steps": 10} override it again.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from .allocation import DEFAULT_BIT_LADDER, DEFAULT_RANK_LADDER
from .build import LoraSettings
from .calibration import CalibrationConfig
from .comparison import ComparisonConfig
from .data import DataConfig
from .errors import QRError
from .evaluate import EvalConfig, check_tasks
from .finetune import FinetuneConfig
from .hardware import resolve_dtype
from .parallel import ParallelConfig
from .pilot import PilotConfig
from .profile_files import profile_values
from .quant import QuantConfig
from .search.bo import BOConfig
from .search.nsga import NSGAConfig
from .sensitivity import SensitivityConfig
from .train import TrainConfig



@dataclass(frozen=True)
class Profile:
    name: str = "default"
    model: str = "embedded"        # "embedded", "tiny", a hub id or a local folder
    dtype: str = "auto"            # compute dtype; "auto" = fastest on this machine (hardware.py)
    device: str = "cpu"
    bit_ladder: tuple = DEFAULT_BIT_LADDER
    rank_ladder: tuple = DEFAULT_RANK_LADDER
    budget_bits: int = 4           # the memory budget is uniform budget_bits at budget_rank
    budget_rank: int = 8
    select_at: tuple = ()          # further budgets (average bits, e.g. 3.5) to select from the same front
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    proxy: TrainConfig = field(default_factory=TrainConfig)
    proxy_metric: str = "loss"     # or a benchmark task: the proxy then minimizes its error rate
    proxy_metric_limit: int = 100  # documents of that task per score
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    nsga: NSGAConfig = field(default_factory=NSGAConfig)
    bo: BOConfig = field(default_factory=BOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _check_type(value, default, where: str):
    """The value a setting gets, or a QRError naming the setting and the type it needs. The type is
    the default's (ints accept no strings or bools, floats accept ints, tuples accept lists); a
    setting whose default is None is not checked."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and (isinstance(default, float) or float(value).is_integer())
        value = type(default)(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise QRError(f"{where} must be {type(default).__name__} like the default {default!r}, got {value!r}; "
                      "fix the profile or the override")
    return value


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
        said = ", ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        raise QRError(f"{where}: unknown setting(s) {said}; known: {sorted(known)}")
    kwargs = {}
    for k, v in values.items():
        default = known[k].default_factory() if known[k].default_factory is not dataclasses.MISSING else known[k].default
        if dataclasses.is_dataclass(default):
            if not isinstance(v, dict):
                raise QRError(f"{where}.{k} must be a mapping of {type(default).__name__} settings, got {v!r}")
            kwargs[k] = _build(type(default), {**dataclasses.asdict(default), **v}, f"{where}.{k}")
        else:
            kwargs[k] = _check_type(v, default if default is not dataclasses.MISSING else None, f"{where}.{k}")
    return cls(**kwargs)


def validate(profile: Profile) -> None:
    """What the stages would otherwise find out after hours: ladders the backend cannot build, budgets
    off the ladders, non-positive ranks, unknown benchmark tasks."""
    from .quant import check_bits, get_backend

    where = f"profile {profile.name!r}"
    try:
        metric = () if profile.proxy_metric == "loss" else (profile.proxy_metric,)
        check_tasks((*profile.eval.tasks, *profile.eval.task_limits, *profile.pilot.tasks, *metric))
    except QRError as e:
        raise QRError(f"{where}: {e}") from None
    check_bits(get_backend(profile.quant), profile.bit_ladder)
    ranks = [r for r in profile.rank_ladder if not (isinstance(r, int) and r > 0)]
    if ranks:
        raise QRError(f"{where}: rank_ladder holds {ranks}; ranks are positive integers, e.g. [4, 8, 16]")
    if profile.budget_rank not in profile.rank_ladder:
        raise QRError(f"{where}: budget_rank {profile.budget_rank} is not on rank_ladder {list(profile.rank_ladder)}")
    lo, hi = min(profile.bit_ladder), max(profile.bit_ladder)
    for bits in (profile.budget_bits, *profile.select_at):
        if not lo <= bits <= hi:
            raise QRError(f"{where}: a budget of {bits} average bits lies outside bit_ladder "
                          f"{list(profile.bit_ladder)}; choose budgets between {lo} and {hi}")


def load_profile(name: str = "default", overrides: dict | None = None) -> Profile:
    """A profile by name or path (its results go to results/<file stem>/), with `overrides`, dotted
    settings such as {"finetune.seeds": [0]}, applied on top."""
    path, values = profile_values(name, overrides)
    values["name"] = path.stem
    profile = _build(Profile, values, f"profile {path.stem!r}")
    validate(profile)
    # Resolved once here, so every stage, cache key and artifact sees the dtype that really computed.
    return dataclasses.replace(profile, dtype=resolve_dtype(profile.dtype, profile.device))
