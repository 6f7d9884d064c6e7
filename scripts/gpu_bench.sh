#!/usr/bin/env bash
# Issue #29 "Fast on one GPU", measured in one device run of about 7-8 minutes (one NVIDIA H200 / H100):
#   1. versions and the card;
#   2. the equality checks of tests/test_fast_inference.py on the GPU (tiny preset, float32): the static
#      decode with its step captured in a CUDA graph gives the release path's tokens, voken features and
#      pictures; the compiled step, merged LoRA, captured / compiled UNet likewise;
#   3. benchmarks/gpu_memory.py --quick --train at full size (the `full` preset: random weights at the real
#      sizes, built first into $PRESET_DIR, ~70 s): one story turn per configuration (bf16, 4bit+offload)
#      and mode (release / graph / compiled), DPM-Solver++ 20 steps apart, the plain transformers and
#      diffusers baselines (eager, and the UNet compiled), stage-1 and stage-2 training throughput (batch
#      16, bf16-mixed; release and all cheap wins) with MFU; the issue's targets judged at the end.
# Results and logs go to $OUT (the device tool's folder) or $BENCH_DIR (default outputs/gpu_bench):
# RESULTS_gpu_full.md, bench.log, equality.log, summary.txt.
#
# The device's python3 has its own torch (2.11 + cu130) but not this project's pins: carry them as wheels.
# Here first, on a machine with pip (once per checkout; .whl/ is git-ignored through .git/info/exclude):
#     bash scripts/gpu_bench.sh wheels
# then on the device, with `.whl` named in the call's carry:
#     bash scripts/gpu_bench.sh
# DRY_RUN=1 runs the same stages on the tiny preset on the CPU with tiny workloads (no wheels, no equality
# stage: that is the test suite itself): a check that the script works, for CI.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
DIR=${BENCH_DIR:-${OUT:-outputs/gpu_bench}}
PRESET_DIR=${PRESET_DIR:-/tmp/full}
# The project's pins that the device image lacks or has in another version (requirements*.txt).
PINS=(transformers==5.23.0 tokenizers==0.23.3 diffusers==0.42.1 peft==0.21.2 bitsandbytes==0.50.2
      webdataset==1.0.2 braceexpand==0.1.7)

if [ "${1:-}" = wheels ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    mkdir -p .whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${PINS[@]}" || exit 1
    # bitsandbytes ships a library per CUDA / ROCm / XPU version (43 MB); the device's torch is cu130, and
    # a carried tree must stay under 64 MiB: keep that library and the CPU one.
    $PY - <<'EOF' || exit 1
import glob, os, zipfile
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    trimmed = path + ".tmp"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            name = item.filename
            if name.endswith(".so") and not name.endswith(("_cuda130.so", "_cpu.so")):
                continue
            zout.writestr(item, zin.read(name))
    os.replace(trimmed, path)
EOF
    du -ch .whl/*.whl | tail -n 1
    exit 0
fi

mkdir -p "$DIR"
SUMMARY="$DIR/summary.txt"
: >"$SUMMARY"
failed=0
stage() {   # stage NAME SECONDS COMMAND...: run (time-limited unless a dry run), log to $DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name"
    local guard=(timeout "$limit")
    [ "$DRY_RUN" = 1 ] && guard=()
    if "${guard[@]}" "$@" >"$DIR/$name.log" 2>&1; then
        echo "$name: ok ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    else
        echo "$name: FAILED, exit $? ($((SECONDS - start)) s); end of $DIR/$name.log:" | tee -a "$SUMMARY"
        tail -n 30 "$DIR/$name.log" | tee -a "$SUMMARY"
        failed=1
    fi
}

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY_RUN" != 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "installing the carried wheels failed" | tee -a "$SUMMARY"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/*.whl: using the machine's packages (run 'bash scripts/gpu_bench.sh wheels' here first)" \
            | tee -a "$SUMMARY"
    fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, torch
versions = []
for name in ("transformers", "diffusers", "peft", "accelerate", "bitsandbytes", "pytorch_lightning"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001 -- report whatever is missing
        versions.append(f"{name} missing ({type(e).__name__})")
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__} on {card}; " + ", ".join(versions))
EOF
[ "$DRY_RUN" != 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    2>&1 | tee -a "$SUMMARY"

if [ "$DRY_RUN" = 1 ]; then
    stage bench 0 $PY benchmarks/gpu_memory.py --dry_run --out "$DIR/RESULTS_gpu_full.md"
else
    MINIGPT5_TEST_DEVICE=cuda stage equality 120 $PY -m pytest -q -p no:cacheprovider tests/test_fast_inference.py
    # The preset (~70 s), bf16 (~3 min with the compilations), training (~1.5 min), 4bit+offload (~40 s), in
    # that order; each process at most 270 s, the whole stage at most 420 s (a run cut short keeps what it
    # measured: the results file is rewritten after each part). Call the device with timeout_s 600.
    stage bench 420 $PY benchmarks/gpu_memory.py --quick --train --preset_dir "$PRESET_DIR" --child_timeout 270 \
        --out "$DIR/RESULTS_gpu_full.md"
fi
[ -f "$DIR/RESULTS_gpu_full.md" ] && cat "$DIR/RESULTS_gpu_full.md"
cat "$SUMMARY"
exit $failed
