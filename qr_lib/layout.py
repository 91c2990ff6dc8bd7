"""Where a run's artifacts live. `Layout` is the one object that spells a results path; every stage,
notebook, table and figure asks it.

    results/<profile>/
      setup.json                      00  the model and the data
      pilot/runs/<config>/seed<k>/    01  the pilot's runs (a Layout of their own, same run folders)
      sensitivity.json                02  Phase I
      base_grid.json                  02  the rungs on the embedded base and on an off-grid control
      evaluations/<key>.json          03  one proxy score per (allocation, proxy level), content-addressed
      nsga.json, bo.json              03, 04  Phases II and III
      search.json                     04  the selection at each budget and what the search cost
      searches/<method>/              variant searches (other ladders): their own nsga/bo/search,
                                      Phase I and the evaluations of the main run
      runs/<method>/seed<k>/          05  result.json, allocation.json, adapter/, lm_eval/ (and
                                      trained.json while lm-eval scores a trained run)
      lengths/x<f>/runs/<method>/seed<k>/   the primary claims' runs at f x the final training
                                      (`make lengths`; a Layout each, like pilot/)
      sizing/<method>.json            the learning curves (`make sizing`)
      proxy_check/<key>.json          06  proxy curves; proxy_check.json their summary
      stock/<task>-<docs>.json        `make stock-eval`
      tables/<name>.{csv,md}, figures/<name>.png
      notebooks/, manifest.json, README.md, reproduce.log   written by `make reproduce`
    results/benchmarks/               `make benchmark` (benchmarks/)

QR_RESULTS_DIR moves the results/ root (tests, or a disk with more room).

`Cache` spells the machine-wide cache's paths the same way (outside git, shared by every checkout;
QR_LIB_CACHE moves it):

    ~/.cache/qr_lib/
      models/<name>/        the embedded model converted from its GGUF, and its tokenizer alone
      blocks/<key>.pt       quantized blocks (algorithm/quant/cache.py)
      data/<name>.json      the parsed fine-tuning pool
      speed/<key>.json      this machine's measured speed (`qr-adaptor estimate --measure`)
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import REPO_DIR
from .errors import QRError

RESULTS_ENV = "QR_RESULTS_DIR"


def results_root() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or REPO_DIR / "results")


def portable(text: str) -> str:
    """`text` with this machine's folders written as any machine would read them: the results root as
    results/, the checkout as ./, the machine-wide cache as $QR_LIB_CACHE/ (for records that tools
    write with absolute paths in them: executed notebooks, lm-eval's results)."""
    roots = {str(results_root()): "results", str(REPO_DIR): ".", str(Cache.here().root): "$QR_LIB_CACHE"}
    for root in sorted(roots, key=len, reverse=True):    # the longest first: results/ may sit in the checkout
        text = text.replace(root + "/", roots[root] + "/")
    return text


def benchmarks_dir(profile: str = "default") -> Path:
    """Where `make benchmark` writes: results/benchmarks/ for the default profile (the committed
    figures), results/benchmarks/<profile>/ for any other, so no run overwrites the committed one."""
    root = results_root() / "benchmarks"
    return root if profile == "default" else root / profile


@dataclass(frozen=True)
class RunDir:
    """One fine-tuning run's folder: its result, what rebuilds its model, the adapter, lm-eval's logs."""
    path: Path

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def allocation(self) -> Path:
        """The allocation, quantization and model the adapter sits on (finetune.load_finetuned reads it)."""
        return self.path / "allocation.json"

    @property
    def trained(self) -> Path:
        """A benchmarked run's scores before lm-eval (deleted once result.json holds them): a run stopped
        during lm-eval resumes there instead of retraining."""
        return self.path / "trained.json"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def lm_eval(self) -> Path:
        return self.path / "lm_eval"

    @property
    def export(self) -> Path:
        return self.path / "export"


@dataclass(frozen=True)
class Layout:
    root: Path
    # A variant search keeps its own nsga/bo/search files but reads the main run's Phase I and shares
    # its evaluation cache: `shared` is that run's folder.
    shared: Path | None = None

    @classmethod
    def of(cls, name: str) -> "Layout":
        """results/<name>/, to read (nothing is created)."""
        return cls(results_root() / name)

    @classmethod
    def for_profile(cls, name: str) -> "Layout":
        """results/<name>/, created and checked writable before any work goes into it."""
        return cls.of(name).writable()

    def writable(self) -> "Layout":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as e:
            raise QRError(f"cannot write results to {self.root} ({e.strerror}); make it writable or point "
                          f"{RESULTS_ENV} at a folder you can write") from None
        return self

    @property
    def _main(self) -> Path:
        return self.shared or self.root

    # -- the stages, in notebook order --------------------------------------------------------
    @property
    def setup(self) -> Path:
        return self.root / "setup.json"

    @property
    def pilot(self) -> "Layout":
        return Layout(self.root / "pilot")

    def at_length(self, factor: float) -> "Layout":
        """The length study's runs at `factor` x the final training (workbook/lengths.py)."""
        return Layout(self.root / "lengths" / f"x{factor:g}")

    def lengths(self) -> list["Layout"]:
        """The length study's folders that exist (lengths/x<f>/), in path order."""
        return [Layout(p) for p in sorted((self.root / "lengths").glob("x*"))]

    def sizing_curve(self, method_id: str) -> Path:
        """One setting's learning curve (workbook/sizing.py)."""
        return self.root / "sizing" / f"{method_id}.json"

    def sizing_curves(self) -> list[Path]:
        return sorted((self.root / "sizing").glob("*.json"))

    @property
    def sensitivity(self) -> Path:
        return self._main / "sensitivity.json"

    def sensitivity_progress(self, key: str) -> Path:
        """Per-block progress of an unfinished Phase I, deleted when it completes."""
        return self._main / f".sensitivity-{key}.partial.json"

    @property
    def base_grid(self) -> Path:
        """Each rung's cost on the embedded base and on its off-grid control (workbook/base_grid.py)."""
        return self._main / "base_grid.json"

    @property
    def evaluations(self) -> Path:
        return self._main / "evaluations"

    def evaluation(self, key: str) -> Path:
        return self.evaluations / f"{key}.json"

    @property
    def nsga(self) -> Path:
        return self.root / "nsga.json"

    @property
    def bo(self) -> Path:
        return self.root / "bo.json"

    @property
    def search(self) -> Path:
        return self.root / "search.json"

    def variant(self, method_id: str) -> "Layout":
        """A variant search's folder (searches/<method>/), sharing this run's Phase I and evaluations."""
        return Layout(self.root / "searches" / method_id, shared=self._main)

    def run(self, method_id: str, seed: int) -> "RunDir":
        return RunDir(self.root / "runs" / method_id / f"seed{seed}")

    def runs(self, method_id: str = "*") -> list["RunDir"]:
        """Every finished run (of one method, or all), in path order."""
        return [RunDir(p.parent) for p in sorted(self.root.glob(f"runs/{method_id}/seed*/result.json"))]

    @property
    def proxy_check(self) -> Path:
        return self.root / "proxy_check.json"

    def proxy_check_curve(self, key: str) -> Path:
        return self.root / "proxy_check" / f"{key}.json"

    def stock(self, task: str, documents: str) -> Path:
        return self.root / "stock" / f"{task}-{documents}.json"

    @property
    def stock_logs(self) -> Path:
        return self.root / "stock" / "lm_eval"

    # -- what readers look at -----------------------------------------------------------------
    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def table(self, name: str, suffix: str = ".md") -> Path:
        return self.tables / f"{name}{suffix}"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def log(self) -> Path:
        """make reproduce's full output (every notebook cell's), appended run by run."""
        return self.root / "reproduce.log"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        """Held by the command that runs on this folder (store.hold_lock): one run per results folder."""
        return self.root / ".lock"

    @property
    def index(self) -> Path:
        return self.root / "README.md"

    def started(self) -> list[str]:
        """The stage artifacts already present: a run from nothing has none."""
        names = {"setup.json": self.setup, "pilot": self.pilot.root, "sensitivity.json": self.sensitivity,
                 "evaluations": self.evaluations, "nsga.json": self.nsga, "bo.json": self.bo,
                 "search.json": self.search, "searches": self.root / "searches", "runs": self.root / "runs",
                 "proxy_check": self.root / "proxy_check"}
        return sorted(k for k, p in names.items() if p.exists())


@dataclass(frozen=True)
class Cache:
    """The machine-wide cache: converted models, quantized blocks, the parsed data pool, measured
    speeds. Outside git and shared by every checkout; rebuilt from nothing where missing."""
    root: Path

    @classmethod
    def here(cls) -> "Cache":
        """QR_LIB_CACHE, else $XDG_CACHE_HOME/qr_lib, else ~/.cache/qr_lib."""
        return cls(Path(os.environ.get("QR_LIB_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qr_lib")))

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    def data(self, name: str) -> Path:
        return self.root / "data" / f"{name}.json"

    def speed(self, key: str) -> Path:
        return self.root / "speed" / f"{key}.json"

    def filled(self) -> list[str]:
        """The cache folders that hold something: a run that finds none starts from nothing."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.iterdir())) \
            if self.root.exists() else []
