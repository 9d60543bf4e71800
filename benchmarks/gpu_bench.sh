#!/usr/bin/env bash
# The one prepared GPU check: `losskit bench --device cuda`, every GPU case, in under 5 minutes.
#
# For a fresh GPU machine with this repository checked out, torch preinstalled and no network: installs
# losskit without touching torch (--no-deps; no build isolation, which would fetch setuptools), prints the
# GPU (nvidia-smi) and the versions (`losskit env`), then runs the bench in three groups, the most wanted
# first, each its own `losskit bench` so that a group cut short by a time limit leaves the others' results:
#   cross_entropy 8192x128256, bfloat16 and float32;
#   linear_cross_entropy 8192x4096x128256, bfloat16;
#   the elementwise losses at 64M elements, float32;
# against torch eager, torch.compile, and Liger-Kernel / Cut Cross-Entropy where they import. Each group's
# table goes to stdout and $OUT/<group>.txt, its CSV and plot to $OUT/<group>/, its progress and any
# traceback to $OUT/<group>.stderr (whose end is printed); then all CSVs are joined into $OUT/bench.csv and
# drawn into $OUT/bench.png. OUT defaults to ./losskit-bench-cuda.
#
# Time: 10 units; each compiles its reference once (torch.compile, ~10-20 s on a cold cache), checks
# losskit against it (bfloat16: against float64 on the GPU), measures memory, then times rounds until
# BUDGET seconds (at least 3 rounds of REPS). The slowest round, linear_cross_entropy's ~7 implementations
# of ~50 ms each (three 8.6 TFLOP products), fits 6 rounds in 3 s.
#
# Usage: benchmarks/gpu_bench.sh [extra `losskit bench` options for every group, e.g. --dtype bfloat16]
# Environment: OUT, PYTHON (default python), REPS (default 10), BUDGET (seconds per unit, default 3),
# WHEELS (default .gpu-wheels: Liger-Kernel's and Cut Cross-Entropy's wheels from benchmarks/gpu_wheels.sh,
# installed first when present).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-$(command -v python || command -v python3)}
out=${OUT:-$PWD/losskit-bench-cuda}
mkdir -p "$out"
start=$SECONDS

nvidia-smi || echo "nvidia-smi failed (exit $?)"
if ! "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .; then
    # The C extensions are CPU kernels: the CUDA bench runs without them, from the source tree.
    echo "pip install failed: running losskit from src/ instead"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
# The libraries compared against, from the wheels benchmarks/gpu_wheels.sh downloaded (no network here;
# their dependencies, torch and triton, come with the machine's CUDA torch). Without them their columns
# say "not installed".
wheels=${WHEELS:-.gpu-wheels}
if compgen -G "$wheels/*.whl" > /dev/null; then
    "$py" -m pip install --quiet --no-deps --no-index "$wheels"/*.whl || echo "installing $wheels/*.whl failed"
else
    echo "no wheels in $wheels: Liger-Kernel and Cut Cross-Entropy are not installed unless the machine has them"
fi
"$py" -m losskit.cli env
echo "setup took $((SECONDS - start)) s"

status=0
group() {  # group NAME CASES [options]: one `losskit bench --device cuda` into $out/NAME*
    local name=$1 cases=$2 rc=0
    shift 2
    echo "=== $name ($((SECONDS - start)) s)"
    "$py" -m losskit.cli bench --device cuda --compile --reps "${REPS:-10}" --budget "${BUDGET:-3}" \
        --cases "$cases" --out "$out/$name" "$@" 2> "$out/$name.stderr" | tee "$out/$name.txt" || rc=$?
    echo "--- end of $out/$name.stderr (exit status $rc)"
    tail -c 3000 "$out/$name.stderr" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 12 || true
    [ "$rc" -ne 2 ] || exit 2  # an argument error (no CUDA device): every group would fail alike
    [ "$rc" -eq 0 ] || status=$rc
}
group cross_entropy cross_entropy "$@"
group linear_cross_entropy linear_cross_entropy "$@"
group elementwise binary_cross_entropy,binary_cross_entropy_with_logits,multilabel_soft_margin_loss,sigmoid_focal_loss,kl_div,mse_loss,rmse_loss "$@"

csvs=("$out"/*/bench.csv)
if [ -e "${csvs[0]}" ]; then
    { head -n 1 "${csvs[0]}"; tail -q -n +2 "${csvs[@]}"; } > "$out/bench.csv"
    "$py" -m losskit.cli plot "$out/bench.csv" --out "$out/bench.png" || echo "the joined plot was not drawn"
fi
echo "bench exit status $status; $((SECONDS - start)) s in all"
exit "$status"
