#!/usr/bin/env bash
# The throughput benchmarks to run on the GPU machine, from the repository root, one stage per `run` call:
#
#   run(command="bash benchmarks/gpu/run_on_gpu.sh main", carry=[".wheels"], timeout_s=600)
#
# (benchmarks/README.md has the whole procedure; make .wheels/ first with benchmarks/gpu/fetch_wheels.sh.)
#
# Stages -- each plans to end inside one call's 10-minute limit (BUDGET_S, default 540 s: no benchmark is
# started with less than a minute of it left; each has its own `timeout`):
#   main    GPU smoke run (tiny model; stops here if it fails), then qwen2_0_5b and qwen2_1_5b at seq 4096,
#           and the Qwen1.5-MoE-A2.7B shape cut to MOE_LAYERS layers (3 on an 80 GB GPU, 6 on a larger one;
#           retried with 2 on OOM). Each: ours vs the HF peer, micro-batch 1, 20 steps after 3 warm-up.
#   knobs   qwen2_1_5b seq 4096, one knob at a time: --attention local, local + --recompute selective,
#           --recompute full (peer: gradient checkpointing), --ours-adam unfused (the default is
#           optim.fused=auto: fused on CUDA), --sdpa-backend cudnn (both).
#   knobs2  qwen2_1_5b seq 4096: --compile (both sides), and the peer alone in --peer-precision amp / bf16.
#
# Writes under $OUT (what comes back; at most 8 files): run.log (everything printed), env.txt (GPU, versions,
# SDPA backends), results.jsonl (one JSON document per benchmark), results_rows.md (rows for
# benchmarks/RESULTS.md: append them there with `cat .../results_rows.md >> benchmarks/RESULTS.md`).
# Rehearse on a CPU machine with EXTRA_ARGS=--dry-run (tiny presets, CPU, fp32).
set -uo pipefail
STAGE=${1:-main}
OUT=${OUT:-$PWD/outputs/gpu_bench}
BUDGET_S=${BUDGET_S:-540}
EXTRA_ARGS=${EXTRA_ARGS:-}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOG=$OUT/run.log
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

say() { echo "$*" | tee -a "$LOG"; }

# 1. The carried wheels (megatron-core, hydra-core, omegaconf, antlr4), into $SITE: the image stays as is.
if ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .wheels/*.whl 2>&1 | grep -v "Running pip as the 'root' user" | tee -a "$LOG"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import megatron.core, hydra, omegaconf, transformers, torch" 2>>"$LOG"; then
    say "run_on_gpu: imports failed (carry .wheels? see benchmarks/README.md)"; exit 1
fi

# 2. What machine this is.
{
    echo "stage $STAGE, $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'EOF'
import platform, torch, transformers, megatron.core
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| transformers", transformers.__version__,
      "| megatron-core", megatron.core.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "SMs", p.multi_processor_count,
          "capability", torch.cuda.get_device_capability())
    b = torch.backends.cuda
    print("SDPA backends enabled: flash", b.flash_sdp_enabled(), "cudnn", b.cudnn_sdp_enabled(),
          "mem_efficient", b.mem_efficient_sdp_enabled(), "math", b.math_sdp_enabled())
EOF
} > "$OUT/env.txt" 2>&1
tee -a "$LOG" <"$OUT/env.txt"

START=$SECONDS
# bench NAME TIMEOUT_S [--no-record] ARGS...: one benchmark process; its exit status.
bench() {
    local name=$1 limit=$2 record=(--record --record-to "$OUT/results_rows.md"); shift 2
    if [[ ${1:-} == --no-record ]]; then record=(); shift; fi
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 60)); then say "=== SKIP $name: ${left}s of the ${BUDGET_S}s budget left"; return 3; fi
    ((limit > left)) && limit=$left
    say "=== $name ($(date -u +%T), timeout ${limit}s): bench_throughput.py $* $EXTRA_ARGS"
    local from
    from=$(wc -l <"$LOG")
    # shellcheck disable=SC2086
    timeout "$limit" "$PY" benchmarks/bench_throughput.py "$@" --json "$OUT/results.jsonl" "${record[@]}" \
        $EXTRA_ARGS >>"$LOG" 2>&1
    local rc=$?
    # This run's table (or the end of its traceback) into the call's output tail too.
    tail -n +"$((from + 1))" "$LOG" | grep -v -E "Warning|warnings.warn|USDT|^ +return func|^ +if hasattr" | tail -n 12
    say "=== $name: exit $rc at +$((SECONDS - START))s"
    return $rc
}

last_was_oom() {
    "$PY" - "$OUT/results.jsonl" <<'EOF'
import json, sys
try:
    doc = json.loads(open(sys.argv[1]).read().splitlines()[-1])
except (OSError, IndexError, ValueError):
    sys.exit(1)
sys.exit(0 if any("OOM" in side.get("error", "") for side in doc["results"].values()) else 1)
EOF
}

M15=(--model qwen2_1_5b --seq-len 4096 --micro-batch 1 --steps 20 --warmup 3)
case "$STAGE" in
main)
    bench smoke 150 --no-record --model qwen2_tiny --vocab-size 4096 --seq-len 1024 --micro-batch 2 \
        --steps 3 --warmup 1 || { say "run_on_gpu: the GPU smoke run failed; stopping (see run.log)"; exit 1; }
    bench qwen2_0_5b 200 --model qwen2_0_5b --seq-len 4096 --micro-batch 1 --steps 20 --warmup 3
    bench qwen2_1_5b 220 "${M15[@]}"
    MOE_LAYERS=${MOE_LAYERS:-$("$PY" -c "import torch; print(6 if torch.cuda.is_available() and \
torch.cuda.get_device_properties(0).total_memory > 120 * 2**30 else 3)")}
    if ! bench moe 220 --model qwen1_5_moe_a2_7b --layers "$MOE_LAYERS" --seq-len 4096 --micro-batch 1 \
        --steps 20 --warmup 3 && last_was_oom; then
        bench moe_2_layers 200 --model qwen1_5_moe_a2_7b --layers 2 --seq-len 4096 --micro-batch 1 \
            --steps 20 --warmup 3
    fi
    ;;
knobs)
    bench attention_local 150 "${M15[@]}" --attention local --peer none
    bench local_selective 150 "${M15[@]}" --attention local --recompute selective --peer none
    bench recompute_full 200 "${M15[@]}" --recompute full
    bench ours_unfused_adam 150 "${M15[@]}" --ours-adam unfused --peer none
    bench sdpa_cudnn 150 "${M15[@]}" --sdpa-backend cudnn
    ;;
knobs2)
    bench compile 330 "${M15[@]}" --compile
    bench peer_amp 120 "${M15[@]}" --skip-ours --peer-precision amp
    bench peer_bf16 120 "${M15[@]}" --skip-ours --peer-precision bf16
    ;;
*)
    say "usage: run_on_gpu.sh main|knobs|knobs2"; exit 2 ;;
esac

# 3. One line per benchmark, for the call's output tail.
"$PY" - "$OUT/results.jsonl" <<'EOF' | tee -a "$LOG"
import json, shlex, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    sys.exit(0)


def knobs(command):
    """The command's options other than the ones every run here sets."""
    args, out, i = shlex.split(command)[2:], [], 0
    while i < len(args):
        if args[i] in ("--model", "--seq-len", "--micro-batch", "--steps", "--warmup", "--layers"):
            i += 2
            continue
        if args[i] != "--dry-run":
            out.append(args[i])
        i += 1
    return " ".join(out) or "(defaults)"


print(f"{'model':18s} {'layers':>6s} {'side':5s} {'tok/s':>9s} {'MFU':>6s} {'peak GiB':>8s} {'loss0':>8s}  knobs")
for doc in map(json.loads, lines):
    c = doc["config"]
    for name, s in doc["results"].items():
        if "error" in s:
            print(f"{c['model']:18s} {c['layers']:6d} {name:5s} {s['error'][:60]}  {knobs(doc['command'])}")
            continue
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a"
        mem = f"{s['peak_memory_gib']:.1f}" if s.get("peak_memory_gib") is not None else "n/a"
        print(f"{c['model']:18s} {c['layers']:6d} {name:5s} {s['tokens_per_s']:9.0f} {mfu:>6s} {mem:>8s} "
              f"{s['loss_step0']:8.4f}  {knobs(doc['command'])}")
    if "ratio_tokens_per_s_ours_over_peer" in doc:
        print(f"{'':18s} {'':6s} ratio ours/peer {doc['ratio_tokens_per_s_ours_over_peer']:.3f}")
EOF
say "run_on_gpu: stage $STAGE done in $((SECONDS - START))s"
