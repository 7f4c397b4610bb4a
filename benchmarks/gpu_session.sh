#!/usr/bin/env bash
# Everything a GPU session checks and measures, in one go (device time is scarce): the GPU
# tests, then proxy throughput at three batch sizes. Results go to $OUT (default gpu-results/);
# under 10 minutes in all (each step has its own time limit).
# Needs the project's Python packages (the proxy image has them) with a CUDA build of torch.
#   bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/env.txt"
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'accelerate', accelerate.__version__)" 2>&1 | tee -a "$out/env.txt"
timeout 120 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$out/tests.txt"
bench() {  # name, seconds allowed, then the benchmark's flags
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/proxy_throughput.py --device cuda "$@" 2>&1 | tee "$out/$name.txt"
}
# The paper's proxy-1m shape and vocabulary; 16 x 2048 tokens per proxy per step. About 10 s a
# measurement (each in a fresh process); the profile comes last (over 60 s on an H200).
bench batch16 150 --batch 16 --steps 60 --repeats 1 --packs 1 --profile
# Small per-proxy steps, where one proxy alone leaves the GPU idlest and packing gains most;
# whole-model torch.compile, without and with the output layer in the graph, at both ends
# (compiling takes most of those measurements' time).
bench batch4 170 --batch 4 --steps 60 --repeats 1 --packs 4 --compile
# Bigger steps: the launch overhead of the small layers spreads over 4x the tokens.
bench batch64 170 --batch 64 --steps 30 --repeats 1 --packs 4 --compile
