"""Loading a profile: a JSON file of settings over the dataclass defaults (qr_lib/config.py), with
dotted overrides, did-you-mean checks on every name, type checks on every value, and validation of
what the stages would otherwise find out after hours.

`smoke` is a tiny random-weight model (tests, CI, minutes), `default` the embedded SmolLM2-135M on
2 CPU cores, `paper` the paper's scale on a GPU. A profile is a JSON file under qr_lib/profiles/ (or
anywhere, by path) that may `include` another; `overrides` like {"proxy.steps": 10} apply on top.
The command line reads the raw values (profile_values, needs_hub) before it imports any Hugging Face
library, because whether a profile reads the hub decides whether the run may go online.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import torch

from .. import PACKAGE_DIR
from ..algorithm.memory import ModelShapes, model_shapes
from ..algorithm.quant import check_bits, get_backend
from ..algorithm.search.problem import check_budget, check_ranks
from ..config import DOMAINS, Profile
from ..data import LOCAL_SUFFIXES, load_finetune
from ..errors import QRError
from ..evaluate import check_tasks
from ..hardware import resolve_dtype
from ..layout import Layout
from ..models import TINY, load_skeleton, tiny_llama
from ..store import plain, read_artifact
from .methods import check_method, load_method, method_ids

PROFILE_DIR = PACKAGE_DIR / "profiles"
LOCAL_MODELS = ("embedded", "tiny")
HUB_DATA = {"finetune": ("alpaca",), "text": ("wikitext2", "c4")}


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def _nest(overrides: dict) -> dict:
    out: dict = {}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise QRError(f"override {dotted!r} reaches into {p!r}, which another override sets to a value; "
                              "give each setting once")
        node[leaf] = value
    return out


def _merge(a: dict, b: dict, where: str = "") -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and k in out and not isinstance(out[k], dict):
            raise QRError(f"setting {where + k!r} is {out[k]!r}, a single value, so {where + k}.{next(iter(v), '')} "
                          f"cannot be set; set {where + k} itself (e.g. --set {where + k}=...)")
        out[k] = _merge(out[k], v, f"{where}{k}.") if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_path(name: str) -> Path:
    """A profile name (a file under qr_lib/profiles/) or the path of a profile JSON anywhere."""
    given = Path(name)
    if given.is_dir():
        raise QRError(f"profile {given} is a folder; give the path of a profile JSON file or one of {profile_names()}")
    if given.suffix == ".json":
        if not given.exists():
            raise QRError(f"profile file {given} does not exist; give a path to a JSON profile or one of "
                          f"{profile_names()}")
        return given
    path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise QRError(f"profile {name!r} does not exist; choose one of {profile_names()} or give the path of a "
                      "profile JSON (see docs/EXTENDING.md)")
    return path


def profile_values(name: str, overrides: dict | None = None, _seen: tuple = ()) -> tuple[Path, dict]:
    """(the profile's file, its values with the dotted `overrides` applied). A profile may start from
    another with `"include": "<name or path>"` and change only what differs (lm-eval's variants)."""
    path = profile_path(name)
    if path.resolve() in _seen:
        raise QRError(f"profile {path} includes itself through {[str(p) for p in _seen]}; break the cycle")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QRError(f"profile {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                      "fix the file") from None
    except UnicodeDecodeError:
        raise QRError(f"profile {path} is not UTF-8 text; save it as UTF-8 JSON") from None
    if not isinstance(values, dict):
        raise QRError(f"profile {path} holds a JSON {type(values).__name__}, not an object of settings; write "
                      '{"setting": value, ...} (see docs/EXTENDING.md)')
    if "include" in values:
        _, base = profile_values(values.pop("include"), None, (*_seen, path.resolve()))
        values = _merge(base, values)
    return path, _merge(values, _nest(overrides or {}))


def needs_hub(values: dict) -> bool:
    """Whether a profile reads anything from the Hugging Face hub: a model that is neither embedded
    nor a local folder, or hub data (Alpaca, WikiText-2, C4)."""
    model, data = values.get("model", "embedded"), values.get("data")
    model = model if isinstance(model, str) else "embedded"      # a wrong type is refused when the profile loads
    data = data if isinstance(data, dict) else {}
    return ((model not in LOCAL_MODELS and not Path(model).expanduser().is_dir())
            or any(data.get(k) in v for k, v in HUB_DATA.items()))


def _check_type(value, default, where: str, nullable: bool = False):
    """The value a setting gets, or a QRError naming the setting and the type it needs. The type is
    the default's (ints accept no strings or bools, floats accept ints, tuples accept lists); a
    setting whose default is None is not checked; only a `nullable` one (typed `X | None`) may be null."""
    if value is None and not nullable:
        raise QRError(f"{where} is null; it is a {type(default).__name__} like the default {default!r} and has no "
                      "null meaning; fix the profile or the override")
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


# Settings whose names changed (a profile written before the change names the old one), by class and
# old name: the error names the new one, which no spelling distance would suggest.
RENAMED = {("Profile", "calibration"): "proxy_check", ("SizingConfig", "steps"): "checkpoints"}


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
        said = ", ".join(f"{k!r} (renamed {RENAMED[cls.__name__, k]!r})" if (cls.__name__, k) in RENAMED
                         else f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        raise QRError(f"{where}: unknown setting(s) {said}; known: {sorted(known)}")
    kwargs = {}
    for k, v in values.items():
        default = known[k].default_factory() if known[k].default_factory is not dataclasses.MISSING else known[k].default
        if dataclasses.is_dataclass(default):
            if not isinstance(v, dict):
                raise QRError(f"{where}.{k} must be a mapping of {type(default).__name__} settings, got {v!r}")
            kwargs[k] = _build(type(default), {**dataclasses.asdict(default), **v}, f"{where}.{k}")
        else:
            kwargs[k] = _check_type(v, default if default is not dataclasses.MISSING else None, f"{where}.{k}",
                                    nullable="None" in str(known[k].type))
    return cls(**kwargs)


def check_device(profile: Profile) -> None:
    """Before a run (not at load: a GPU profile is planned on a laptop with `estimate`): the device is
    one this torch can compute on."""
    device = profile.device
    if device.startswith("cuda") and (not torch.cuda.is_available()
                                      or int(device.partition(":")[2] or 0) >= torch.cuda.device_count()):
        raise QRError(f"profile {profile.name!r}: device is {device!r}, and this torch ({torch.__version__}) sees "
                      f"{torch.cuda.device_count()} CUDA device(s); run it on a GPU machine, or --set device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise QRError(f"profile {profile.name!r}: device is 'mps', which this machine lacks; --set device=cpu")


def check_domains(profile: Profile, where: str = "", fix: str = "fix the profile or the override") -> None:
    """Every setting in config.DOMAINS against its domain (null passes only where the type check let
    it, i.e. where the field is typed `X | None`)."""
    for name, domain in DOMAINS.items():
        value = profile
        for part in name.split("."):
            value = getattr(value, part)
        if value is not None and not domain.test(value):
            raise QRError(f"{where or f'profile {profile.name!r}'}: {name} is {value!r}; it is {domain.says}, "
                          f"e.g. {domain.example}; {fix}")


def validate(profile: Profile) -> None:
    """What the stages would otherwise find out after hours: ladders the backend cannot build or that
    repeat a rung, budgets off the ladders, non-positive ranks or group sizes, learning rates that are
    not finite and positive, unknown benchmark tasks, a pilot without a (low, high) pair of rungs."""
    where = f"profile {profile.name!r}"
    check_domains(profile)
    for name, ladder in (("bit_ladder", profile.bit_ladder), ("rank_ladder", profile.rank_ladder)):
        if len(set(ladder)) != len(ladder):
            raise QRError(f"{where}: {name} {list(ladder)} repeats a rung; list each once, e.g. {sorted(set(ladder))}")
    try:
        metric = () if profile.proxy_metric == "loss" else (profile.proxy_metric,)
        check_tasks((*profile.eval.tasks, *profile.eval.task_limits, *profile.pilot.tasks, *metric))
    except QRError as e:
        raise QRError(f"{where}: {e}") from None
    check_bits(get_backend(profile.quant), profile.bit_ladder)
    try:
        check_bits(get_backend(profile.quant), (*profile.pilot.bits, *profile.pilot.sweep_bits))
    except QRError as e:
        raise QRError(f"{where}: pilot.bits or pilot.sweep_bits: {e}") from None
    try:
        check_ranks(profile.rank_ladder, profile.budget_rank)
    except QRError as e:
        raise QRError(f"{where}: {e}") from None
    pilot_bits = profile.pilot.bits
    if len(pilot_bits) != 2 or not pilot_bits[0] < pilot_bits[1]:
        raise QRError(f"{where}: pilot.bits is {list(pilot_bits)}; it is the pilot's (low, high) rungs, e.g. [3, 4]")
    for bits in (profile.budget_bits, *profile.select_at):
        try:
            check_budget(bits, profile.bit_ladder)
        except QRError as e:
            raise QRError(f"{where}: {e}") from None


def model_shapes_of(profile: Profile) -> ModelShapes:
    """The model's shapes from its config alone, without its weights."""
    if profile.model == TINY:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):   # tiny_llama seeds the generator
            return model_shapes(tiny_llama())
    return model_shapes(load_skeleton(profile.model))


def check_model(profile: Profile) -> ModelShapes:
    """From the model's config alone, without its weights: a decoder whose blocks carry the seven
    linears QR-Adaptor allocates, and shapes the backend can quantize (HQQ: a group size that divides
    every one's input width). Returns the shapes."""
    try:
        shapes = model_shapes_of(profile)
        backend = get_backend(profile.quant)     # each backend says which shapes it can quantize
        for out_features, in_features in sorted({s for block in shapes.linears for s in block}):
            backend.check_shape(out_features, in_features)
    except QRError as e:
        raise QRError(f"profile {profile.name!r}: {e}") from None
    return shapes


def profile_methods(profile: Profile) -> dict[str, str]:
    """Every method the profile's stages may run or read -> the setting that first names it: the final
    runs' (every file when it names none), the proxy check's, the sizing's and the pilot's reference."""
    named = {}
    for setting, ids in (("finetune.methods", profile.finetune.methods or method_ids()),
                         ("proxy_check.methods", profile.proxy_check.methods),
                         ("sizing.methods", (*profile.sizing.methods, *profile.sizing.key_methods)),
                         ("eval.methods", profile.eval.methods or ()), ("pilot.reference", (profile.pilot.reference,))):
        for method_id in ids:
            named.setdefault(method_id, setting)
    return named


def check_methods(profile: Profile, named: dict[str, str], shapes: ModelShapes | None = None) -> None:
    """Before any work, each method (id -> where it was named): its file loads, its quantization
    overrides lie in their domains, and its allocation fits the profile (methods.check_method). The
    message names the method, where it was named, and the fix."""
    shapes = shapes or model_shapes_of(profile)
    for method_id, setting in named.items():
        try:
            method = load_method(method_id)
            check_domains(dataclasses.replace(profile, quant=method.quant_config(profile)), f"method {method.id}",
                          "fix the method file's quant")
            check_method(method, profile, shapes)
        except QRError as e:
            raise QRError(f"profile {profile.name!r}, {setting}: {e}; or drop the method from {setting}") from None


def check_data(profile: Profile) -> None:
    """A local fine-tuning file is read whole when the profile loads: it exists, is UTF-8, every line
    or row parses with its fields, and it holds the examples the three splits ask for."""
    if profile.data.finetune.endswith(LOCAL_SUFFIXES):
        try:
            load_finetune(profile.data)
        except QRError as e:
            raise QRError(f"profile {profile.name!r}: {e}") from None


def load_profile(name: str = "default", overrides: dict | None = None) -> Profile:
    """A profile by name or path (its results go to results/<file stem>/), with `overrides`, dotted
    settings such as {"finetune.seeds": [0]}, applied on top."""
    path, values = profile_values(name, overrides)
    values["name"] = path.stem
    profile = _build(Profile, values, f"profile {path.stem!r}")
    validate(profile)
    check_methods(profile, profile_methods(profile), check_model(profile))
    check_data(profile)
    # Resolved once here, so every stage, cache key and artifact sees the dtype that really computed.
    return dataclasses.replace(profile, dtype=resolve_dtype(profile.dtype, profile.device))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def other_settings(profile: Profile, layout: Layout) -> list[str]:
    """How the settings of the results under `layout` differ from `profile`'s, as dotted keys with both
    values; empty where there are no results yet or they are this profile's. The results' settings are
    those their setup artifact records (every run writes it first). Profiles hold their dtype resolved
    (load_profile), so a float32 run and an "auto" profile on a CPU with native bf16 differ here."""
    record = read_artifact(layout.setup, quiet=True)
    if record is None or "profile" not in record["config"]:
        return []
    theirs, ours = _flat(record["config"]["profile"]), _flat(plain(profile))
    return [f"{k}: {theirs.get(k, '(unset)')!r} there, {ours.get(k, '(unset)')!r} here"
            for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
