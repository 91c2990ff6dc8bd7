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
