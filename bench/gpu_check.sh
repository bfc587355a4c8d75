#!/usr/bin/env bash
# The GPU check in one command: GPU-only tests, private-torch checks on this torch, the GPT-2 small
# matrix, a ResNet matrix, then the comparison tables and the target checks (P1-P4), printed last. Runs
# from a plain checkout (fxmem need not be installed) in about 8 minutes; results, plots and logs go to
# $OUT (default ./out).
#
#   bash bench/gpu_check.sh          # CUDA: gpt2_small + resnet18, bf16 autocast
#   bash bench/gpu_check.sh --cpu    # the same flow on tiny presets in fp32, for a machine without a GPU
#   bash bench/gpu_check.sh --sweep  # GPU-only tests, then an absolute-budget sweep on gpt small (about
#                                    # 4 minutes): every fitting plan's measured peak under its budget,
#                                    # predicted against measured peak (python -m fxmem.bench.sweep);
#                                    # meanwhile the default plans of GPT-2 small, ResNet-18 and ViT
#                                    # small, ViT small's under 1100 MiB and torch.compile's ViT small
#                                    # run once; all write allocation traces to $OUT/traces
#                                    # (fxmem.bench.trace), replayed last against the simulator's
#                                    # variants (python -m fxmem.bench.replay), and kernel by kernel
#                                    # (--kernels, to $OUT/kernels.txt)
#
# Environment: OUT (results folder), PYTHON (default python3), RESNET (resnet18 | resnet50 | tiny ...),
# JOBS (configurations compiling at once, default 3 on GPU), GPT_BUDGET_S / RESNET_BUDGET_S (seconds),
# COMPAT=0 (skip the private-torch checks, e.g. when they already ran on a CPU with the same torch),
# GPU_TESTS=0 (skip the tests marked gpu), REPLAY=0 (--sweep: leave the replays of the traces, which need
# no GPU, to another machine: python -m fxmem.bench.replay [--kernels] $OUT/traces).
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-./out}
START=$(date +%s)

if [ "${1:-}" = "--cpu" ]; then
    MODE=cpu DEVICE=cpu DTYPE=float32 STEPS=3 WARMUP=1 JOBS=${JOBS:-1}
    GPT=models/gpt.py:tiny
    RESNET_SPEC=models/resnet.py:${RESNET:-tiny}
    GPT_BUDGET=${GPT_BUDGET_S:-300} RESNET_BUDGET=${RESNET_BUDGET_S:-300}
    GPT_CONFIGS=(compile eager checkpoint compile:budget=0.5 compile:fp8 fxmem fxmem:memory_budget=0.25
        'fxmem:{"memory_budget": 0.1, "quantize": "auto", "on_infeasible": "best_effort"}')
    RESNET_CONFIGS=(compile eager checkpoint fxmem fxmem:memory_budget=0.25,quantize=int8)
elif [ -z "${1:-}" ]; then
    MODE=gpu DEVICE=cuda DTYPE=bfloat16 STEPS=10 WARMUP=3 JOBS=${JOBS:-3}
    GPT=models/gpt.py:gpt2_small
    RESNET_SPEC=models/resnet.py:${RESNET:-resnet18}
    GPT_BUDGET=${GPT_BUDGET_S:-220} RESNET_BUDGET=${RESNET_BUDGET_S:-150}
    # Most telling rows first: a spent time budget drops the last ones.
    GPT_CONFIGS=(compile
        'fxmem:{"memory_budget": "3000MiB", "quantize": "auto", "on_infeasible": "best_effort"}'
        'fxmem:{"memory_budget": "3000MiB", "on_infeasible": "best_effort"}'
        eager compile:budget=0.5 fxmem compile:fp8 checkpoint compile:budget=0.1
        'fxmem:{"memory_budget": 0.25, "quantize": "fp8"}')
    RESNET_CONFIGS=(compile
        'fxmem:{"memory_budget": "550MiB", "quantize": "auto", "on_infeasible": "best_effort"}'
        eager fxmem compile:budget=0.5 'fxmem:{"memory_budget": 0.25, "quantize": "int8"}' checkpoint)
elif [ "${1:-}" = "--sweep" ]; then
    MODE=sweep DEVICE=cuda DTYPE=bfloat16 JOBS=${JOBS:-3}
else
    echo "usage: bash bench/gpu_check.sh [--cpu | --sweep]" >&2
    exit 2
fi

mkdir -p "$OUT"
TORCH=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || { echo "$PY cannot import torch; point PYTHON at an interpreter that can" >&2; exit 1; }
echo "== fxmem check ($MODE): torch $TORCH, $PY, out=$OUT"
if [ "$MODE" != cpu ]; then
    $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { echo "CUDA is not available; use --cpu" >&2; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
fi

# 1. GPU-only tests (those marked gpu), if pytest is there and any exist.
if [ "$MODE" = cpu ]; then
    echo "== gpu tests: skipped (--cpu)"
elif [ "${GPU_TESTS:-1}" = 0 ]; then
    echo "== gpu tests: skipped (GPU_TESTS=0)"
elif ! $PY -m pytest --version >/dev/null 2>&1; then
    echo "== gpu tests: skipped (pytest is not installed)"
else
    timeout 90 $PY -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/gpu_tests.log" 2>&1
    status=$?
    case $status in
        0) echo "== gpu tests: passed ($(tail -n 1 "$OUT/gpu_tests.log"))" ;;
        5) echo "== gpu tests: none collected" ;;
        124) echo "== gpu tests: TIMED OUT after 90 s (log: $OUT/gpu_tests.log)" ;;
        *) echo "== gpu tests: FAILED (status $status)"; tail -n 25 "$OUT/gpu_tests.log" ;;
    esac
fi

# 1b. The private-torch checks on this machine's torch (CI runs another version): the reference's
# stopped partition, the graph its CSE leaves fxmem, the fallback, and the eager codegen's use of
# Inductor's joint-graph passes, on CPU, about 30 s.
if [ "$MODE" != cpu ] && [ "${COMPAT:-1}" != 0 ] && $PY -m pytest --version >/dev/null 2>&1; then
    timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_backend.py tests/test_eager_codegen.py \
        -k "reference or fallback or cse or test_eager_codegen" \
        >"$OUT/torch_compat_tests.log" 2>&1
    status=$?
    case $status in
        0) echo "== torch $TORCH compat tests: passed ($(tail -n 1 "$OUT/torch_compat_tests.log"))" ;;
        124) echo "== torch $TORCH compat tests: TIMED OUT after 90 s (log: $OUT/torch_compat_tests.log)" ;;
        *) echo "== torch $TORCH compat tests: FAILED (status $status)"; tail -n 25 "$OUT/torch_compat_tests.log" ;;
    esac
fi

# 2. (--sweep) The absolute-budget sweep; beside it, the default plans of GPT-2 small, ResNet-18 and ViT
# small and ViT small's under an absolute budget below its default's peak, one step each, all traced;
# then the traces replayed against the simulator's variants.
traced_step() {  # NAME SPEC SECONDS [OPTIONS_JSON [SYSTEM]]: one step of fxmem (or SYSTEM), traced
    local options=${4:-"{}"} system=${5:-fxmem}
    timeout "$3" $PY -m fxmem.bench.runner --spec "$2" --label "$1 $system" \
        --config "{\"system\": \"$system\", \"options\": $options}" \
        --device "$DEVICE" --dtype "$DTYPE" --steps 2 --warmup 1 --trace "$OUT/traces" \
        >"$OUT/$1.json" 2>"$OUT/$1.log"
    echo "   $1: status $?; $(cut -c1-420 "$OUT/$1.json")"
}
if [ "$MODE" = sweep ]; then
    echo "== sweep: models/gpt.py:small ($DEVICE, $DTYPE), 5 absolute budgets; beside it the default plans of"
    echo "   GPT-2 small, ResNet-18 and ViT small, ViT small at memory_budget 1100MiB, and torch.compile's ViT small"
    {
        traced_step gpt2_small models/gpt.py:gpt2_small 240
        traced_step resnet18 models/resnet.py:resnet18 150
        traced_step vit_small models/vit.py:vit_small 150
        traced_step vit_small_1100MiB models/vit.py:vit_small 150 \
            '{"memory_budget": "1100MiB", "on_infeasible": "best_effort"}'
        traced_step vit_small_compile models/vit.py:vit_small 120 '{}' torch.compile
    } >"$OUT/beside.txt" 2>&1 &
    beside=$!
    timeout 420 $PY -m fxmem.bench.sweep models/gpt.py:small --device "$DEVICE" --dtype "$DTYPE" --points 5 \
        --jobs "$JOBS" --time-budget 180 --json "$OUT/sweep.json" --trace "$OUT/traces" \
        >"$OUT/sweep.txt" 2>"$OUT/sweep.log"
    echo "   status $? after $(($(date +%s) - START)) s; log: $OUT/sweep.log"
    wait "$beside"
    cat "$OUT/beside.txt"
    if [ "${REPLAY:-1}" != 0 ]; then
        timeout 120 $PY -m fxmem.bench.replay "$OUT/traces" >"$OUT/replay.txt" 2>"$OUT/replay.log"
        echo "   replay: status $? after $(($(date +%s) - START)) s"
        timeout 60 $PY -m fxmem.bench.replay --kernels "$OUT/traces" >"$OUT/kernels.txt" 2>>"$OUT/replay.log"
        echo "   kernel by kernel: status $?; $OUT/kernels.txt"
    fi
    echo
    cat "$OUT/sweep.txt"
    echo
    echo "== traced steps replayed (error of each predicted peak against the measured one)"
    cat "$OUT/replay.txt" 2>/dev/null || echo "   not run (REPLAY=0): python -m fxmem.bench.replay $OUT/traces"
    exit 0
fi

# 2. The matrices, each under a time budget; progress goes to a log, the last lines are shown.
bench() {  # NAME SPEC BUDGET CONFIGS...
    local name=$1 spec=$2 budget=$3
    shift 3
    echo "== bench $name: $spec ($DEVICE, $DTYPE, $STEPS steps after $WARMUP warm-up, budget ${budget}s)"
    timeout $((budget + 90)) $PY -m fxmem.bench.cli "$spec" --device "$DEVICE" --dtype "$DTYPE" \
        --steps "$STEPS" --warmup "$WARMUP" --jobs "$JOBS" --time-budget "$budget" --timeout "$budget" \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" --configs "$@" \
        >"$OUT/$name.txt" 2>"$OUT/$name.log"
    echo "   status $? after $(($(date +%s) - START)) s; log: $OUT/$name.log"
    grep -E '^\[[0-9]+/[0-9]+\] .*: ' "$OUT/$name.log" | cut -c1-220
}
bench gpt "$GPT" "$GPT_BUDGET" "${GPT_CONFIGS[@]}"
bench resnet "$RESNET_SPEC" "$RESNET_BUDGET" "${RESNET_CONFIGS[@]}"

# 3. Tables and target checks, last.
echo
$PY -m fxmem.bench.targets --table --gpt "$OUT/gpt.json" --resnet "$OUT/resnet.json"
echo
echo "== done in $(($(date +%s) - START)) s; results in $OUT (gpt.json, resnet.json, *.png, *.log)"
