#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (≈ 4-6 min on an H200, within 10 min at worst):
# the CUDA tests, the scaling benchmark (stacks of 15, 150, 1500 models, fp32 and TF32), and
# the whole `mnistlab study` command.
#   bash benchmarks/gpu_check.sh FASHION_MNIST_FOLDER [OUT_FOLDER]
# GPU_CHECK_ALL=1 adds the per-technique comparison (bench_gpu.py --techniques) and the step
# profile (profile_gpu.py): about 2 more minutes.
# Expects a Python with CUDA PyTorch, Triton and mnistlab's dependencies (or wheels in .whl/).
set -u
data=${1:-/usr/share/datasets/fashion-mnist}
out=${2:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
    tests/test_kernels.py tests/test_stack_sizing.py --durations=5 >"$out/pytest.log" 2>&1
echo "pytest exit $?"; tail -25 "$out/pytest.log"
timeout 390 python3 benchmarks/bench_gpu.py --data "$data" --json "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench.log"
if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
    timeout 120 python3 benchmarks/bench_gpu.py --data "$data" --sizes 15 --techniques \
        --json "$out/bench_techniques.json" 2>&1 | tee "$out/techniques.log"
    timeout 90 python3 benchmarks/profile_gpu.py --data "$data" 2>&1 | tee "$out/profile.log"
fi
# The whole command a user runs: training, statistics, plots, report.
start=$(date +%s%N)
timeout 100 python3 -c "import sys; from mnistlab.cli import main; sys.argv[0] = 'mnistlab'; main()" \
    study --data "$data" --device cuda --out /tmp/gpu_runs >"$out/study.log" 2>&1
echo "mnistlab study exit $? after $(( ($(date +%s%N) - start) / 1000000 )) ms"
tail -20 "$out/study.log"
cp /tmp/gpu_runs/*/summary.json /tmp/gpu_runs/*/env.json "$out/" 2>/dev/null
