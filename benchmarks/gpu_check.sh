#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with CUDA and no network: the GPU tests, the smoke profile on
# CUDA (random tiny model), and the memory benchmark at the shapes of LLaMA-3-8B and Qwen3-8B with random
# weights. Everything it measures lands under results/benchmarks/gpu/ (OUT= moves it), with the versions
# and the GPU's name. Needs the project's packages (make venv with a CUDA torch; see docs/RUNNING.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/benchmarks/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } > "$OUT/machine.txt" 2>&1
"$PY" -m pytest -q -m gpu tests/test_gpu.py -rA > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests: exit $?"
QR_RESULTS_DIR="$OUT/results" "$PY" -m qr_lib reproduce --profile smoke --set device=cuda --only 00 02 03 04 05 \
    > "$OUT/smoke_cuda.txt" 2>&1; echo "smoke on cuda: exit $?"
for model in meta-llama/Meta-Llama-3-8B Qwen/Qwen3-8B; do
    "$PY" benchmarks/paper_shapes.py --model "$model" --device cuda \
        --out "$OUT/paper_shapes/${model//\//--}.json" > "$OUT/paper_shapes_${model//\//--}.txt" 2>&1
    echo "$model memory benchmark: exit $?"
done
