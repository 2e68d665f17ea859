#!/usr/bin/env bash
# The prepared GPU check (one command, <= 8 minutes on one GPU), for the lent device machine:
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# That machine's python3 has torch, triton and transformers but not sglang (its wheels are larger than what
# a call can carry), so this checks the trainer and the kernels on the GPU; the engine side is measured by
# `sglgym bench --base-url` on any GPU server with sglang. Writes JSON (with the device name) to $OUT
# (or bench/results/ when OUT is unset): the backends' update steps/s at 1 rank in bf16/fp32-master,
# the full-weight gather, and the kernels' GPU benchmark.
# Async GRPO (bench/bench_async.py) needs an engine, so sglang: run it on a GPU machine that has it,
#   python bench/bench_async.py --steps 40 --json bench/results/async-<gpu>.json
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 - <<'PY' > "$out/gpu-device.json"
import json, torch
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "capability": torch.cuda.get_device_capability()}))
PY
model=$(PYTHONPATH=$PWD:$PWD/bench python3 -c \
  "from sglgym.models import build_tiny_model; from bench_trainer import SPEC; print(build_tiny_model(spec=SPEC))" | tail -1)
for backend in hf fsdp; do
  timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/trainer_ranks.py \
    --model "$model" --backend "$backend" --samples 64 --prompt 512 --gen 512 --steps 5 \
    | grep '^{' > "$out/gpu-trainer-$backend.json" || echo "{\"backend\": \"$backend\", \"error\": \"failed\"}" > "$out/gpu-trainer-$backend.json"
done
timeout 240 python3 bench/bench_kernels.py gpu --out "$out/gpu-kernels.json"
ls -l "$out"
