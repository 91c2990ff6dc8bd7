"""QR-Adaptor workbook: per-block bit-width and LoRA-rank allocation for quantized fine-tuning.

The package reads top-down:
  algorithm/  QR-Adaptor itself: allocations, quantization backends (quant/), the memory model, the
              LoRA build and training loop, Phase I (sensitivity), the proxy fine-tune, and the
              search (search/: Phase II NSGA-II, Phase III Bayesian refinement).
  workbook/   the reproduction around it: profiles (config), the pilot, the final fine-tunes and their
              comparison, the studies that size and check them (sizing, lengths, base grid,
              check), stock lm-eval, figures, report, explorer.
  models.py, data.py, evaluate.py   the inputs both use: models, datasets, lm-eval.
  store.py    artifacts: atomic checksummed JSON with provenance, and the stage protocol.
  layout.py   the results layout and the cache: the one module that spells their paths.
  cli.py      every entry point (`qr-adaptor ...`).
profiles/, methods/, tasks/ and reference/ are data: run settings, final-run methods, lm-eval task
YAMLs (the prompts), and the paper's reference numbers and model configs.
"""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent   # profiles/, methods/, tasks/, reference/ live here
REPO_DIR = PACKAGE_DIR.parent                   # notebooks/, results/ in a checkout
