#!/usr/bin/env bash
# The whole GPU measurement in ONE device call (~8 minutes of the 15-minute lease, leaving room for a rerun):
#
#   run(command="bash benchmarks/gpu/run.sh", carry=[".wheels"], timeout_s=540)
#
# (make .wheels/ first with benchmarks/gpu/fetch_wheels.sh; benchmarks/README.md has the procedure.)
# Rehearsal on a CPU machine, tiny shapes (what tests/benchmarks/test_gpu_script_dry_run.py runs in CI):
#
#   DRY_RUN=1 OUT=/tmp/gpu_rehearsal bash benchmarks/gpu/run.sh
#
# Phases, in order; each writes its file under $OUT as soon as it has it, so a timeout keeps what finished:
#   0. carried wheels into $SITE
#   1. env.txt: device, date, this command, python/torch/CUDA/cuDNN/NCCL/transformers/megatron-core versions; its
#      python is the import gate (megatron.core, hydra, omegaconf, transformers, torch)
#   2. preflight.json: one-rank NCCL all_reduce; per model shape the SDPA backends that take it, their time and
#      the one torch picks; a bf16 8192^3 matmul ceiling. Stops here if the collective fails.
#   3. gate_fp32.json, gate_bf16.json: ours vs transformers, same weights and batch, on the GPU, BEFORE any
#      timing: fp32 step-0 loss within 1e-4; bf16 losses over 6 steps within 2e-2 and both falling
#      (benchmarks/gpu/gates.py). Stops here if a gate fails (FORCE=1 times anyway).
#   4. results.jsonl + results_rows.md: timed runs, headline first: qwen2_1_5b seq 4096 bf16 ours vs
#      transformers; the Qwen1.5-MoE-A2.7B shape cut to MOE_LAYERS layers (no profiler); qwen2_0_5b; then, while
#      the budget lasts, one row per kernel knob (ours alone): plain kernels, chunked cross-entropy, MoE experts
#      as a loop. No benchmark starts with less than its own timeout left of BUDGET_S.
# run.log has everything printed; the last lines are a summary table (the call's output tail).
set -uo pipefail
OUT=${OUT:-$PWD/outputs/gpu_bench}
BUDGET_S=${BUDGET_S:-480}
DRY_RUN=${DRY_RUN:-0}
FORCE=${FORCE:-0}
MOE_LAYERS=${MOE_LAYERS:-4}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOG=$OUT/run.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
START=$SECONDS
say() { echo "[+$((SECONDS - START))s] $*" | tee -a "$LOG"; }
DRY=()
# The CPU rehearsal's processes are slower than the GPU's (imports, a shared CPU): every limit is scaled up.
SCALE=${SCALE:-$([[ $DRY_RUN == 1 ]] && echo 6 || echo 1)}
BUDGET_S=$((BUDGET_S * SCALE))
if [[ $DRY_RUN == 1 ]]; then DRY=(--dry-run); export CUDA_VISIBLE_DEVICES=""; fi

# 0. Wheels.
if ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .wheels/*.whl 2>&1 | grep -v "Running pip as the 'root' user" | tee -a "$LOG"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 1. What machine, what software, what command. Its python is also the import gate (one process importing them).
{
    echo "date $(date -u +%FT%TZ)"
    echo "command: bash benchmarks/gpu/run.sh (DRY_RUN=$DRY_RUN BUDGET_S=$BUDGET_S MOE_LAYERS=$MOE_LAYERS FORCE=$FORCE)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -q . && echo '(+ uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'PYEOF'
import platform, hydra, omegaconf, torch, transformers, megatron.core
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| transformers", transformers.__version__,
      "| megatron-core", megatron.core.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "SMs", p.multi_processor_count,
          "capability", torch.cuda.get_device_capability(), "| NCCL", torch.cuda.nccl.version())
    b = torch.backends.cuda
    print("SDPA backends enabled: flash", b.flash_sdp_enabled(), "cudnn", b.cudnn_sdp_enabled(),
          "mem_efficient", b.mem_efficient_sdp_enabled(), "math", b.math_sdp_enabled())
PYEOF
} >"$OUT/env.txt" 2>&1
tee -a "$LOG" <"$OUT/env.txt"
if ! grep -q "^python .* | megatron-core " "$OUT/env.txt"; then
    say "run.sh: imports failed (carry .wheels? see benchmarks/README.md)"; exit 1
fi
say "imports ok"

# 2. Preflight.
if ! timeout $((90 * SCALE)) "$PY" benchmarks/gpu/preflight.py "${DRY[@]}" --json "$OUT/preflight.json" 2>&1 \
        | grep -v "USDT" | tee -a "$LOG" | grep "^preflight:"; then
    say "run.sh: preflight failed (see run.log)"; exit 1
fi
MATMUL=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['matmul']['tflops'])" "$OUT/preflight.json")
say "preflight done; matmul ceiling ${MATMUL} TFLOP/s"

# bench NAME TIMEOUT_S [--no-record] ARGS...: one bench_throughput.py process, its exit status.
bench() {
    local name=$1 limit=$(($2 * SCALE)) record=(--json "$OUT/results.jsonl" --record --record-to "$OUT/results_rows.md")
    shift 2
    if [[ ${1:-} == --no-record ]]; then record=(); shift; fi
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < limit)); then say "=== SKIP $name: ${left}s of the ${BUDGET_S}s budget left (needs ${limit}s)"; return 3; fi
    say "=== $name (timeout ${limit}s): bench_throughput.py $* ${DRY[*]}"
    timeout "$limit" "$PY" benchmarks/bench_throughput.py "$@" "${record[@]}" --matmul-tflops "$MATMUL" "${DRY[@]}" \
        2>&1 | grep -v -E "USDT|Warning|warnings.warn" >>"$LOG"
    local rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc"
    return "$rc"
}

# 3. Correctness gates, before any timing (real shape, cut to a few layers).
bench gate_fp32 120 --no-record --model qwen2_1_5b --layers 2 --seq-len 1024 --precision fp32 --steps 1 --warmup 0 \
    --no-profile --json "$OUT/gate_fp32.json"
bench gate_bf16 120 --no-record --model qwen2_1_5b --layers 4 --seq-len 2048 --precision bf16 --steps 6 --warmup 0 \
    --no-profile --json "$OUT/gate_bf16.json"
gates_ok=1
for kind in fp32 bf16; do
    "$PY" benchmarks/gpu/gates.py "$kind" "$OUT/gate_$kind.json" | tee -a "$LOG" | grep -q ": pass" || gates_ok=0
done
if ((gates_ok == 0)) && [[ $FORCE != 1 ]]; then say "run.sh: a correctness gate failed; nothing timed (FORCE=1 to time anyway)"; exit 1; fi

# 4. Timed runs, headline first. Ours runs with the job's kernel defaults (auto: fused SwiGLU and cross-entropy,
#    grouped MoE GEMMs, foreach grad norm on CUDA + bf16); the knob rows switch one thing back.
M15=(--model qwen2_1_5b --seq-len 4096 --micro-batch 1 --steps 20 --warmup 3)
bench headline_qwen2_1_5b 150 "${M15[@]}"
bench moe 150 --model qwen1_5_moe_a2_7b --layers "$MOE_LAYERS" --seq-len 4096 --micro-batch 1 --steps 10 --warmup 3 \
    --no-profile
bench qwen2_0_5b 100 --model qwen2_0_5b --seq-len 4096 --micro-batch 1 --steps 20 --warmup 3
bench knob_plain_kernels 70 "${M15[@]}" --peer none --no-profile --override trainer.fused_swiglu=false \
    --override trainer.cross_entropy=megatron --override optim.foreach_grad_norm=false
bench knob_chunked_ce 70 "${M15[@]}" --peer none --no-profile --override trainer.cross_entropy=chunked
bench knob_moe_loop 90 --model qwen1_5_moe_a2_7b --layers "$MOE_LAYERS" --seq-len 4096 --micro-batch 1 --steps 10 \
    --warmup 3 --no-profile --peer none --override trainer.moe_grouped_gemm=false

# Summary (the call's output tail).
"$PY" benchmarks/gpu/summary.py "$OUT/results.jsonl" 2>&1 | tee -a "$LOG"
say "run.sh: done"
