"""Proxy candidates and final runs in parallel, on Dask.

Why Dask rather than Ray: it is pure Python, installs in seconds beside the pinned stack, and the
same code runs on a laptop (LocalCluster), on a multi-GPU node (dask-cuda's LocalCUDACluster: one
worker per GPU, each seeing only its own) and on a cluster (dask-jobqueue's SLURMCluster, or any
scheduler address). Nothing here needs Ray's actors or object store: a candidate is one function call
that writes one file.

Workers share the content-addressed evaluation cache on a filesystem (fitness.py): a worker computes a
candidate and writes its record atomically, and the caller reads every record back from the cache, in
its own order, exactly as a serial run does. So results equal a serial run's with the same seed, a
killed worker loses only the candidate it was computing (Dask retries it elsewhere), and a rerun
recomputes nothing that finished.

`parallel.backend: "serial"` (the default) keeps everything in-process.
    local workers:   {"parallel": {"backend": "dask", "workers": 2}}
    a multi-GPU node: {"parallel": {"backend": "dask"}, "device": "cuda"}   (one worker per GPU)
    a SLURM cluster: start dask-jobqueue's SLURMCluster, then {"parallel": {"backend": "dask",
                     "address": "tcp://scheduler:8786"}}
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import QRError


@dataclass(frozen=True)
class ParallelConfig:
    backend: str = "serial"        # "serial" or "dask"
    workers: int = 2               # local CPU workers (on CUDA: one per visible GPU instead)
    threads_per_worker: int = 1    # torch threads per worker; workers x threads <= cores
    address: str | None = None     # a running Dask scheduler to use instead of a local cluster
    retries: int = 2               # times a task whose worker died is retried elsewhere


@contextmanager
def executor(cfg: ParallelConfig, device: str = "cpu"):
    """A Dask client for `cfg` (None for the serial backend), closed on exit."""
    if cfg.backend == "serial":
        yield None
        return
    if cfg.backend != "dask":
        raise QRError(f"parallel.backend {cfg.backend!r} is not 'serial' or 'dask'")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise QRError("parallel.backend 'dask' needs dask[distributed]; run `make venv` (it is pinned)") from None
    cluster = None
    if cfg.address:
        client = Client(cfg.address)
    elif device.startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise QRError("one worker per GPU needs dask-cuda: `pip install dask-cuda` on the GPU machine") from None
        cluster = LocalCUDACluster(threads_per_worker=cfg.threads_per_worker)
        client = Client(cluster)
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True)
        client = Client(cluster)
    client.run(_limit_threads, cfg.threads_per_worker)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _limit_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


_EVALUATORS: dict = {}


def _evaluate(profile, cache_dir: str, allocation: dict, fidelity) -> str:
    """On a worker: score one candidate into the shared cache (an evaluator per profile and cache,
    kept for the worker's life, so the model loads once); returns the record's key."""
    from .allocation import Allocation
    from .fitness import ProxyEvaluator
    from .store import content_hash

    key = content_hash([profile, cache_dir])
    if key not in _EVALUATORS:
        _EVALUATORS[key] = ProxyEvaluator(profile, Path(cache_dir), progress=False)
    return _EVALUATORS[key].evaluate(Allocation.from_dict(allocation), fidelity)["key"]


def evaluate_all(client, profile, cache_dir: Path, allocations: list, fidelity, retries: int) -> None:
    """Score `allocations` on the workers; their records land in the shared cache."""
    futures = [client.submit(_evaluate, profile, str(cache_dir), a.to_dict(), fidelity, pure=False, retries=retries)
               for a in allocations]
    client.gather(futures)


def _finetune(profile, method, seed: int, out_dir: str) -> None:
    from .finetune import run
    run(profile, method, seed, Path(out_dir), progress=False)


def finetune_all(client, profile, out_dir: Path, todo: list) -> None:
    """Final runs (method, seed) on the workers; the caller reads them back from their folders. A
    searched method's selection must exist first (search.json), as in a serial run."""
    futures = [client.submit(_finetune, profile, method, seed, str(out_dir), pure=False,
                             retries=profile.parallel.retries) for method, seed in todo]
    client.gather(futures)
