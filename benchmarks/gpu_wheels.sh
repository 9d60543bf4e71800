#!/usr/bin/env bash
# Downloads the wheels of the two libraries the GPU bench compares against, for a GPU machine that has no
# network: Liger-Kernel (its fused linear cross-entropy, cross_entropy and kl_div) and Cut Cross-Entropy
# (`cce_exact`). Both are pure Python over Triton (about 1 MiB together), so they are fetched without
# their dependencies: the GPU machine's CUDA torch already ships triton. Pinned, so that every GPU run
# compares against the same code.
#
# Run where PyPI is reachable, then bring .gpu-wheels/ to the GPU machine beside the checkout (it is git-
# ignored); benchmarks/gpu_bench.sh installs whatever wheels it finds there, without dependencies.
#
# Usage: benchmarks/gpu_wheels.sh   Environment: PYTHON (default python), WHEELS (default .gpu-wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-$(command -v python || command -v python3)}
wheels=${WHEELS:-.gpu-wheels}
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l "$wheels"
