#!/usr/bin/env bash
# Download into .wheels/ (git-ignored) what the GPU machine lacks to run benchmarks/bench_throughput.py.
#
# The device machine has Python 3.12, torch 2.11 (CUDA 13), transformers, numpy, packaging, PyYAML and
# psutil, but no megatron-core, hydra-core, omegaconf or antlr4, and no package registry: the wheels travel
# in the `run` tool's carry (64 MiB for the working tree and carried paths together). Not needed there:
# wandb, datatrove, matplotlib (pretrain.build imports none of them), flash-attn (SDPA reaches the
# FlashAttention/cuDNN kernels), TransformerEngine/apex (megatron-core falls back to torch).
#
#   bash benchmarks/gpu/fetch_wheels.sh            # then: run(..., carry=[".wheels"]); see benchmarks/README.md
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.wheels
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
mkdir -p "$DEST"

# One version of each (two of one package stop `pip install --no-deps` there).
MEGATRON=megatron-core==0.16.1            # cp312 manylinux_2_28 binary wheel (its dataset helper is prebuilt)
PURE=(hydra-core==1.3.2 omegaconf==2.3.1)   # pure-Python wheels (the versions the CPU tests use)
ANTLR=antlr4-python3-runtime==4.9.3       # hydra/omegaconf pin 4.9.*; on PyPI an sdist only

rm -f "$DEST"/megatron_core-* "$DEST"/hydra_core-* "$DEST"/omegaconf-* "$DEST"/antlr4_python3_runtime-*
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "$MEGATRON"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "${PURE[@]}"
# Build the sdist into a py3-none-any wheel HERE: the GPU machine then installs it with --no-index and
# without a build step (no setuptools download for an isolated build there).
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$ANTLR"

ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
"$PY" - "$total" "$tree" "$LIMIT_MIB" <<'PYEOF'
import sys
wheels, tree, limit = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mib = 1 << 20
print(f"wheels: {wheels / mib:.1f} MiB; working tree that travels: {tree / mib:.1f} MiB; "
      f"together {(wheels + tree) / mib:.1f} MiB (limit {limit} MiB)")
if wheels + tree > limit * mib:
    sys.exit(f"fetch_wheels: over the {limit} MiB carry limit")
PYEOF
