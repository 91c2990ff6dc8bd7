import json
import re

import pytest

from qr_lib.errors import QRError
from qr_lib.workbook.profiles import (
    load_profile,
    needs_hub,
    profile_names,
    profile_values,
)


def test_profiles_load():
    assert {"smoke", "default", "paper"} <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p.name == name
    assert load_profile("smoke").model == "tiny"
    assert load_profile("default").model == "embedded"


def test_overrides_and_errors():
    # bitsandbytes builds 4 and 8 bits only: every rung and every method the profile names must fit it.
    p = load_profile("smoke", {"proxy.steps": 7, "quant.backend": "bnb", "bit_ladder": [4, 8], "select_at": [],
                               "pilot.bits": [4, 8], "finetune.methods": ["lora16", "nf4", "qr_adaptor"],
                               "proxy_check.methods": ["qr_adaptor"], "sizing.methods": ["lora16", "nf4"],
                               "sizing.key_methods": ["lora16", "nf4"]})
    assert p.proxy.steps == 7 and p.quant.backend == "bnb" and p.proxy.batch_size == 4
    with pytest.raises(QRError, match="unknown setting"):
        load_profile("smoke", {"proxy.stepz": 1})
    with pytest.raises(QRError, match="choose one of"):
        load_profile("nope")


def test_a_profile_can_be_a_file_anywhere(tmp_path):
    import json
    path = tmp_path / "my_run.json"
    path.write_text(json.dumps({"model": "tiny", "dtype": "float32", "quant": {"group_size": 64}, "finetune": {"seeds": [0]}}))
    p = load_profile(str(path), {"eval.limit": 3})
    assert p.name == "my_run" and p.model == "tiny" and p.finetune.seeds == (0,) and p.eval.limit == 3
    path.write_text("{not json")
    with pytest.raises(QRError, match="not valid JSON"):
        load_profile(str(path))
    with pytest.raises(QRError, match="does not exist"):
        load_profile(str(tmp_path / "missing.json"))


def test_command_line_overrides_parse_as_json_where_they_can():
    from qr_lib.cli import parse_overrides
    assert parse_overrides(["finetune.seeds=[0, 1]", "eval.limit=20", "model=tiny"]) == {
        "finetune.seeds": [0, 1], "eval.limit": 20, "model": "tiny"}
    with pytest.raises(QRError, match="KEY=VALUE"):
        parse_overrides(["finetune.seeds"])


def test_settings_are_checked_when_the_profile_loads():
    with pytest.raises(QRError, match="nsga.pop_size must be int"):
        load_profile("smoke", {"nsga.pop_size": "4"})
    with pytest.raises(QRError, match="did you mean 'steps'"):
        load_profile("smoke", {"proxy.stepz": 4})
    with pytest.raises(QRError, match="'calibration' \\(renamed 'proxy_check'\\)"):     # a profile older than the name
        load_profile("smoke", {"calibration.top_k": 3})
    assert load_profile("smoke", {"finetune.lr": 1}).finetune.lr == 1.0      # an int where a float goes
    with pytest.raises(QRError, match="data.n_train must be int"):
        load_profile("smoke", {"data.n_train": 2.5})


def test_ladders_and_budgets_are_checked_before_any_work():
    with pytest.raises(QRError, match="cannot quantize to \\[5\\] bits"):
        load_profile("smoke", {"bit_ladder": [2, 4, 5]})
    with pytest.raises(QRError, match="outside bit_ladder"):
        load_profile("smoke", {"budget_bits": -4})
    with pytest.raises(QRError, match="positive integers"):
        load_profile("smoke", {"rank_ladder": [-8, 8]})
    with pytest.raises(QRError, match="budget_rank 7 is not on rank_ladder"):
        load_profile("smoke", {"budget_rank": 7})


def test_only_profiles_that_read_the_hub_may_go_online():
    assert not needs_hub(profile_values("default")[1]) and not needs_hub(profile_values("smoke")[1])
    assert needs_hub(profile_values("paper")[1])
    assert needs_hub(profile_values("default", {"data.text": "c4"})[1])


def test_a_profile_can_include_another_and_change_only_what_differs(tmp_path):
    import json
    gpu = load_profile("gpu")
    assert gpu.device == "cuda" and gpu.data == load_profile("default").data
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"include": str(loop)}))
    with pytest.raises(QRError, match="includes itself"):
        load_profile(str(loop))


@pytest.mark.parametrize("overrides, message", [
    ({"bit_ladder": [2, 4, 4]}, "repeats a rung"),
    ({"rank_ladder": [8, 8, 16]}, "repeats a rung"),
    ({"proxy.lr": float("nan")}, "proxy.lr is nan"),
    ({"finetune.lr": -1e-4}, "finetune.lr is -0.0001"),
    ({"quant.group_size": 0}, "quant.group_size is 0"),
    ({"quant.group_size": -64}, "quant.group_size is -64"),
    ({"model.name": "/x"}, "a single value"),
    ({"pilot.bits": [4, 3]}, "pilot.bits is [4, 3]"),
    ({"pilot.bits": [3]}, "pilot.bits is [3]"),
])
def test_bad_settings_are_refused_when_the_profile_loads(overrides, message):
    with pytest.raises(QRError, match=re.escape(message)):
        load_profile("smoke", overrides)


def test_a_profile_that_is_a_folder_an_array_or_not_utf8_is_named(tmp_path):
    folder = tmp_path / "looks.json"
    folder.mkdir()
    with pytest.raises(QRError, match="is a folder"):
        load_profile(str(folder))
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(QRError, match="JSON list, not an object"):
        load_profile(str(array))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"model": "caf\xe9"}')
    with pytest.raises(QRError, match="not UTF-8"):
        load_profile(str(latin))


def test_a_hint_never_names_the_backend_already_in_use():
    with pytest.raises(QRError) as got:
        load_profile("smoke", {"bit_ladder": [2, 4, 5]})
    assert "backend 'hqq' cannot quantize to [5] bits" in str(got.value) and "use backend 'hqq'" not in str(got.value)


def test_the_model_is_checked_from_its_config_when_the_profile_loads(tmp_path):
    """Before any work, without weights: a group size that does not divide a linear's input width, and
    a folder whose model is no decoder with the seven linears."""
    with pytest.raises(QRError, match="group_size 96 does not divide in_features 64"):
        load_profile("smoke", {"quant.group_size": 96})
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "intermediate_size": 128,
                                                  "vocab_size": 100}))
    (bert / "tokenizer.json").write_text("{}")          # present, so the check reaches the architecture
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(QRError, match="not a causal language model|no `model.layers`|lacks linear modules"):
        load_profile("smoke", {"model": str(bert)})


def _bad_values(domain) -> list:
    """Values outside a domain of config.DOMAINS, the edges first."""
    from qr_lib import config as C
    return {C.POSITIVE: [0, -1], C.NON_NEGATIVE: [-1], C.FRACTION: [1.5, -0.1], C.PROBABILITY: [1.5, -0.1],
            C.LEVEL: [0, 1], C.LEARNING_RATE: [1e308, 1.5, 0], C.SEEDS: [[], [-1]], C.POSITIVE_ITEMS: [[], [0]], C.POSITIVE_ITEMS_OR_NONE: [[0], [-1]],
            C.NON_NEGATIVE_ITEMS: [[], [-1]]}.get(domain, [1.5] if "correlation" in domain.says else ["bogus"])


def _leaves(cls, prefix=""):
    """(dotted name, field) of every setting of a config dataclass, nested ones walked."""
    import dataclasses
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaves(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_setting_out_of_its_domain_or_null_is_refused_at_load_naming_it():
    """The table of domains (config.DOMAINS) fed every edge outside each one, and every setting that
    has no null meaning fed null: each refused when the profile loads, the setting and its value named."""
    from qr_lib.config import DOMAINS, Profile
    for name, domain in DOMAINS.items():
        for value in _bad_values(domain):
            with pytest.raises(QRError, match=f"{re.escape(name)} is [^;]+; it is"):
                load_profile("smoke", {name: value})
    nulls = [name for name, f in _leaves(Profile) if "None" not in str(f.type) and name != "name"]
    assert len(nulls) > 90
    for name in nulls:
        with pytest.raises(QRError, match=f"{re.escape(name.rsplit('.', 1)[-1])} is null"):
            load_profile("smoke", {name: None})
