import pytest
import torch

from qr_lib.algorithm import sensitivity as S
from qr_lib.config import QuantConfig, SensitivityConfig
from qr_lib.store import write_artifact

Q = QuantConfig(group_size=64, hqq_optimize=False)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine, they said.",
         "Rain fell on the old town all night long.", "She opened the door and saw the sea."]


def _model(tok):
    from qr_lib.models import tiny_llama
    return tiny_llama(vocab=len(tok))


def test_kl_is_positive_falls_with_bits_and_the_model_is_restored(tok):
    model = _model(tok)
    x = torch.randint(0, len(tok), (1, 8))
    before = model(input_ids=x).logits
    r = S.measure(model, tok, TEXTS, SensitivityConfig(bits=(2, 8), seq_len=16), Q, progress=False)
    assert r["bits"] == [2, 8] and len(r["kl"]["2"]) == 4
    assert all(k2 > k8 > 0 for k2, k8 in zip(r["kl"]["2"], r["kl"]["8"]))
    assert torch.equal(before, model(input_ids=x).logits)


def test_profile_resumes_from_partial_results_and_never_from_an_edited_one(tok, tmp_path):
    import json
    partial = tmp_path / "partial.json"
    write_artifact(partial, {"progress of": partial.name}, {"2:0": 123.0, "2:1": 456.0})
    r = S.measure(_model(tok), tok, TEXTS, SensitivityConfig(bits=(2,), seq_len=16), Q, partial=partial,
                  progress=False)
    assert r["kl"]["2"][:2] == [123.0, 456.0] and r["kl"]["2"][2] < 1
    # The report's case: one KL value edited in the progress file (2.476 for 0.0025) with its checksum
    # left as it was: named, and every block measured again.
    write_artifact(partial, {"progress of": partial.name}, {"2:0": 0.0025, "2:1": 456.0})
    record = json.loads(partial.read_text())
    record["result"]["2:0"] = 2.476
    partial.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="damaged or was edited.*measuring its blocks again"):
        r = S.measure(_model(tok), tok, TEXTS, SensitivityConfig(bits=(2,), seq_len=16), Q, partial=partial,
                      progress=False)
    assert all(k < 1 for k in r["kl"]["2"])


def test_bits_the_backend_lacks_are_refused(tok):
    from qr_lib.errors import QRError
    with pytest.raises(QRError, match="cannot quantize to \\[2\\] bits"):
        S.measure(_model(tok), tok, TEXTS, SensitivityConfig(bits=(2,)), QuantConfig(backend="bnb"), progress=False)


def test_run_reuses_its_artifact_and_recomputes_a_changed_or_tampered_one(monkeypatch, tmp_path, smoke, base):
    import dataclasses
    import json

    from qr_lib.layout import Layout
    layout = Layout(tmp_path)
    first = S.run(smoke, layout, *base, progress=False)
    real = S.measure
    monkeypatch.setattr(S, "measure", lambda *a, **k: pytest.fail("recomputed a finished Phase I"))
    assert S.run(smoke, layout, *base, progress=False) == first
    calls = []
    monkeypatch.setattr(S, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    changed = dataclasses.replace(smoke, sensitivity=dataclasses.replace(smoke.sensitivity, seq_len=32))
    S.run(changed, layout, *base, progress=False)                       # one config field changed
    assert len(calls) == 1
    record = json.loads(layout.sensitivity.read_text())
    record["result"]["kl"]["2"][0] = 0.0                                 # one number tampered
    layout.sensitivity.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="damaged or was edited"):
        S.run(changed, layout, *base, progress=False)
    assert len(calls) == 2
