import pytest

from qr_lib.config import load_profile, profile_names
from qr_lib.errors import QRError


def test_profiles_load():
    assert {"smoke", "default", "paper"} <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p.name == name
    assert load_profile("smoke").model == "tiny"
    assert load_profile("default").model == "embedded"


def test_overrides_and_errors():
    p = load_profile("smoke", {"proxy.steps": 7, "quant.backend": "bnb"})
    assert p.proxy.steps == 7 and p.quant.backend == "bnb" and p.proxy.batch_size == 4
    with pytest.raises(QRError, match="unknown setting"):
        load_profile("smoke", {"proxy.stepz": 1})
    with pytest.raises(QRError, match="choose one of"):
        load_profile("nope")


def test_a_profile_can_be_a_file_anywhere(tmp_path):
    import json
    path = tmp_path / "my_run.json"
    path.write_text(json.dumps({"model": "tiny", "dtype": "float32", "finetune": {"seeds": [0]}}))
    p = load_profile(str(path), {"eval.limit": 3})
    assert p.name == "my_run" and p.model == "tiny" and p.finetune.seeds == (0,) and p.eval.limit == 3
    path.write_text("{not json")
    with pytest.raises(QRError, match="not valid JSON"):
        load_profile(str(path))
    with pytest.raises(QRError, match="does not exist"):
        load_profile(str(tmp_path / "missing.json"))


def test_command_line_overrides_parse_as_json_where_they_can():
    from qr_lib.reproduce import parse_overrides
    assert parse_overrides(["finetune.seeds=[0, 1]", "eval.limit=20", "model=tiny"]) == {
        "finetune.seeds": [0, 1], "eval.limit": 20, "model": "tiny"}
    with pytest.raises(QRError, match="KEY=VALUE"):
        parse_overrides(["finetune.seeds"])
