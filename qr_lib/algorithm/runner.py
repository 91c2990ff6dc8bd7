"""Where independent pieces of work run: in this process, or on Dask workers. Passed in, never set.

A runner maps a module-level function over argument tuples. The work it runs here (a proxy score, a
final run) writes its own artifact into a folder every worker shares, and the caller reads every
artifact back in its own order, exactly as a serial run does: so results equal a serial run's, a
killed worker loses only the piece it was computing (Dask retries it elsewhere), and a rerun
recomputes nothing that finished. The runner knows nothing of what it runs.

Why Dask rather than Ray: it is pure Python, installs in seconds beside the pinned stack, and the
same code runs on a laptop (LocalCluster), on a multi-GPU node (dask-cuda's LocalCUDACluster: one
worker per GPU, each seeing only its own) and on a cluster (dask-jobqueue's SLURMCluster, or any
scheduler address). A piece of work here is one function call that writes one file; nothing needs
Ray's actors or object store.

    serial (default): {"parallel": {"backend": "serial"}}
    local workers:    {"parallel": {"backend": "dask", "workers": 2}}
    a multi-GPU node: {"parallel": {"backend": "dask"}, "device": "cuda"}   (one worker per GPU)
    a SLURM cluster:  start dask-jobqueue's SLURMCluster, then {"parallel": {"backend": "dask",
                      "address": "tcp://scheduler:8786"}}
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

from ..config import ParallelConfig
from ..errors import QRError


class Runner(Protocol):
    parallel: bool

    def map(self, fn: Callable, calls: list[tuple], done: Callable[[int], None] | None = None) -> list: ...


class SerialRunner:
    """Everything in this process, in order."""
    parallel = False

    def map(self, fn, calls, done=None):
        out = []
        for k, args in enumerate(calls):
            out.append(fn(*args))
            if done is not None:
                done(k)
        return out


SERIAL = SerialRunner()


class DaskRunner:
    """Every call on the cluster's workers; a call whose worker died is retried `retries` times."""
    parallel = True

    def __init__(self, client, retries: int):
        self.client, self.retries = client, retries

    def map(self, fn, calls, done=None):
        """Every call on the workers; `done(k)` as call k finishes, in whatever order they finish."""
        from dask.distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False, retries=self.retries) for args in calls]
        if done is not None:
            index = {f.key: k for k, f in enumerate(futures)}
            for future in as_completed(futures):
                done(index[future.key])
        return self.client.gather(futures)


def each(runner: Runner, label: str, calls: list[tuple], worker: Callable, here: Callable, names: list[str],
         progress: bool = True) -> list:
    """The one loop of every stage that trains. A parallel runner first runs `worker(*call)` for every
    call on its workers (each loads its own model and writes its own artifact), with a progress line as
    each finishes; then `here(*call)` runs in this process, in order: it reads every finished artifact
    back (or, on the serial runner, computes it, with a progress line before each). So a parallel run
    ends with exactly a serial run's results."""
    finished = []

    def say(k: int) -> None:
        finished.append(k)
        print(f"[{label} {len(finished)}/{len(calls)}] {names[k]}: finished on a worker", flush=True)
    if runner.parallel and calls:
        runner.map(worker, calls, say if progress else None)
    out = []
    for k, (call, name) in enumerate(zip(calls, names), 1):
        if progress and not runner.parallel:
            print(f"[{label} {k}/{len(calls)}] {name}", flush=True)
        out.append(here(*call))
    return out


@contextmanager
def open_runner(cfg: ParallelConfig, device: str = "cpu"):
    """The runner `cfg` asks for, its cluster closed on exit."""
    if cfg.backend == "serial":
        yield SERIAL
        return
    if cfg.backend != "dask":
        raise QRError(f"parallel.backend {cfg.backend!r} is not 'serial' or 'dask'")
    try:
        import dask
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
        # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands every freed block
        # back to the kernel and faults it in again, and a LoRA step takes 1.27x as long (measured: two
        # workers, 40 steps each, 86.9 s against 68.6 s). glibc's own threshold is used instead.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True)
        client = Client(cluster)
    client.run(_limit_threads, cfg.threads_per_worker)
    try:
        yield DaskRunner(client, cfg.retries)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _limit_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
