#!/usr/bin/env bash
# The CUDA path, checked on a machine with one NVIDIA GPU, in under 8 minutes, from the repository alone.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. venvs: .venv-gpu (kubeseg + onnx extra + pytest) and .venv-oracle-gpu (nnunetv2==2.8.1), both
#    with --system-site-packages so that a CUDA torch already installed on the machine is used
#    (pip installs the CUDA build from its index otherwise; constraints.txt pins the rest). Existing
#    venvs are reused (KUBESEG_GPU_VENV / KUBESEG_ORACLE_PYTHON name others).
# 2. the CUDA unit tests (tests/test_cuda.py: AMP training steps, GPU inference against the CPU);
# 3. training, kubeseg and nnunetv2 taking turns (benchmarks/train.py --device cuda, a few hundred
#    iterations), with GPU utilisation sampled by nvidia-smi every second: iterations/s ratio;
# 4. prediction (benchmarks/predict.py --device cuda), float16 and bfloat16 autocast, softmax and
#    resampling on the GPU: time ratio kubeseg/nnunetv2 and voxel agreement.
# Each step has its own time limit; a step that fails or runs out of time is reported and the
# next one still runs. Everything printed is also in OUT_DIR (default gpu-check-<date>).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo "$(( $(date +%s) - START )) s"; }
PY=${PYTHON:-python3}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no nvidia-smi: no GPU here"; exit 2; }

echo "== venvs ($(elapsed))"
VENV=${KUBESEG_GPU_VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv --system-site-packages "$VENV" || exit 3
fi
if ! "$VENV/bin/python" -c "import kubeseg, onnxruntime, pytest" 2>/dev/null; then
  timeout 240 "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[onnx]' pytest || {
    echo "FAILED: pip install of kubeseg into $VENV (no package index reachable?)"; exit 3; }
fi
ORACLE=${KUBESEG_ORACLE_PYTHON:-.venv-oracle-gpu/bin/python}
if [ ! -x "$ORACLE" ]; then
  $PY -m venv --system-site-packages .venv-oracle-gpu && ORACLE=.venv-oracle-gpu/bin/python
fi
if ! "$ORACLE" -c "import nnunetv2" 2>/dev/null; then
  timeout 180 "$ORACLE" -m pip install -q "nnunetv2==2.8.1" || echo "FAILED: pip install nnunetv2 (the comparisons below will fail)"
fi
export KUBESEG_ORACLE_PYTHON=$(realpath "$ORACLE") PYTHONPATH=$PWD
# nnunetv2 would torch.compile its network on CUDA (minutes of warm-up, beyond this budget);
# kubeseg does not compile, so both run eager
export nnUNet_compile=f
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" || exit 4

echo "== CUDA unit tests ($(elapsed))"
timeout 120 "$VENV/bin/python" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider || echo "FAILED (or timed out): CUDA unit tests"

echo "== training, kubeseg vs nnunetv2, GPU utilisation ($(elapsed))"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/nvidia_smi.csv" &
SMI=$!
timeout 180 "$VENV/bin/python" benchmarks/train.py --device cuda --cases 6 --shape 40 112 112 --epochs 3 \
  --iterations 100 --val-iterations 5 --workers 4 --threads 2 --keep "$OUT/train" || echo "FAILED (or timed out): training benchmark"
kill $SMI 2>/dev/null; wait $SMI 2>/dev/null
awk -F', ' '{n++; s+=$2; if ($2>m) m=$2} END {if (n) printf "GPU utilisation during training: mean %.0f %%, max %d %%, %d samples\n", s/n, m, n}' "$OUT/nvidia_smi.csv"

# the model just trained (nnU-Net layout; both tools predict from it), else a random-weight one
MODEL_ARGS=()
if [ -f "$OUT/train/kubeseg/results/fold_0/checkpoint_final.pth" ]; then MODEL_ARGS=(--model "$OUT/train/kubeseg/results"); fi
for dtype in float16 bfloat16; do
  echo "== prediction, kubeseg ($dtype autocast) vs nnunetv2 (float16), CUDA ($(elapsed))"
  timeout 60 "$VENV/bin/python" benchmarks/predict.py --device cuda --autocast $dtype --cases 2 --shape 64 192 192 \
    --repeats 2 --backends torch ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --keep "$OUT/predict" || echo "FAILED (or timed out): prediction benchmark ($dtype)"
done
echo "== done in $(elapsed); log in $OUT/gpu_check.log"
