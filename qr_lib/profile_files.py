"""Profile files, read without the libraries the stages need: names, paths, JSON and overrides.

The command line reads these before anything heavy is imported (whether a profile needs the hub
decides whether the run may go online); config.py builds the typed Profile from the same values.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import QRError

PROFILE_DIR = Path(__file__).parent / "profiles"
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
        node[leaf] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_path(name: str) -> Path:
    """A profile name (a file under qr_lib/profiles/) or the path of a profile JSON anywhere."""
    given = Path(name)
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
    if "include" in values:
        _, base = profile_values(values.pop("include"), None, (*_seen, path.resolve()))
        values = _merge(base, values)
    return path, _merge(values, _nest(overrides or {}))


def needs_hub(values: dict) -> bool:
    """Whether a profile reads anything from the Hugging Face hub: a model that is neither embedded
    nor a local folder, or hub data (Alpaca, WikiText-2, C4)."""
    model = values.get("model", "embedded")
    data = values.get("data", {})
    return ((model not in LOCAL_MODELS and not Path(model).expanduser().is_dir())
            or any(data.get(k) in v for k, v in HUB_DATA.items()))
