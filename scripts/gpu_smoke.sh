#!/usr/bin/env bash
# Smoke test at MiniGPT-5's real widths on one GPU, without the real weights:
#   the `real_width` preset (config/real_width.yaml: real widths, 2-layer LLaMA / ViT / text encoder,
#   full Q-Former, mapper, UNet and VAE; random weights in the real file formats, read by the real
#   loading code) -> stage 1 on the CC3M samples -> stage 2 on the VIST samples (LoRA), both with
#   train_eval.py's GPU defaults (bf16-mixed) -> batched prediction on VIST (50 PNDM steps, 512 px)
#   -> benchmark rows 4 and 5 (batched vs single generation, generate's overhead) on the GPU.
# Every stage runs even when an earlier one failed (the later ones then report what is missing);
# the exit status is non-zero if any failed. Logs and results go under $SMOKE_DIR (default
# outputs/gpu_smoke); $SMOKE_DIR/summary.txt lists each stage with its time.
# Needs about 12 GB of GPU memory and 7 GB of disk; about 5 minutes on one H100 / H200. On the GPU each
# stage has a time limit (a hang guard).
# DRY_RUN=1 runs every stage on the tiny preset on the CPU with tiny workloads (1 diffusion step, a few
# tokens, benchmarks/run.py --dry_run) and no time limits: a check that the script works, for CI.
# PRESET and DEVICE choose the preset and device otherwise (PRESET=tiny DEVICE=cpu: full workloads on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DIR=${SMOKE_DIR:-outputs/gpu_smoke}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    PRESET=tiny DEVICE=cpu STEPS=${STEPS:-1} BENCH_FLAGS="--dry_run --threads 1" SD_STEPS=1 NEW_TOKENS=8 WORKERS=0
fi
STEPS=${STEPS:-4}
BENCH_FLAGS=${BENCH_FLAGS:---quick}
PRESET=${PRESET:-real_width}
DEVICE=${DEVICE:-cuda}
SD_STEPS=${SD_STEPS:-50}
NEW_TOKENS=${NEW_TOKENS:-64}
WORKERS=${WORKERS:-4}
ACCELERATOR=gpu
[ "$DEVICE" = cpu ] && ACCELERATOR=cpu
mkdir -p "$DIR"
# A fresh run each time: train_eval.py would give a second run's checkpoints a -v1 name (stage 2 would
# then start from the first run's stage 1) and refuse a prediction folder that already holds predictions.
rm -rf "$DIR/checkpoints" "$DIR/predictions"
SUMMARY="$DIR/summary.txt"
: >"$SUMMARY"
failed=0

stage() {   # stage NAME SECONDS COMMAND...: run (with a time limit, except in a dry run), log to $DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name"
    local guard=(timeout "$limit")
    [ "$DRY_RUN" = 1 ] && guard=()
    if "${guard[@]}" "$@" >"$DIR/$name.log" 2>&1; then
        echo "$name: ok ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    else
        echo "$name: FAILED, exit $? ($((SECONDS - start)) s); end of $DIR/$name.log:" | tee -a "$SUMMARY"
        tail -n 25 "$DIR/$name.log" | tee -a "$SUMMARY"
        failed=1
    fi
}

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
$PY -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name() if '$DEVICE' != 'cpu' else 'CPU')" \
    | tee -a "$SUMMARY"

stage weights 300 $PY weights.py preset "$PRESET" "$DIR/$PRESET"
CONFIG="$DIR/$PRESET/$PRESET.yaml"
export WEIGHTFOLDER="$DIR/checkpoints" OUTPUT_FOLDER="$DIR/predictions"
COMMON=(--model_config "$CONFIG" --accelerator "$ACCELERATOR" --gpus 0 --num_workers "$WORKERS" --per_device_train_batch_size 4
        --per_device_eval_batch_size 4 --real_batch_size 4 --warmup_steps 1 --learning_rate 1e-4
        --num_train_epochs 100 --max_steps "$STEPS")

IS_STAGE2=False DATAFOLDER=datasets/CC3M stage stage1 300 $PY train_eval.py --is_training True \
    --train_data_path cc3m_train.tsv --val_data_path cc3m_val.tsv --model_save_name stage1_cc3m "${COMMON[@]}"
IS_STAGE2=True DATAFOLDER=datasets/VIST stage stage2 300 $PY train_eval.py --is_training True \
    --train_data_path train_cleaned.json --val_data_path val_cleaned.json --stage1_weight stage1_cc3m.ckpt \
    --model_save_name stage2_vist "${COMMON[@]}"
OUTPUT_SUFFIX=_VIST IS_STAGE2=True DATAFOLDER=datasets/VIST stage predict 300 $PY train_eval.py --is_training False \
    --test_data_path val_cleaned.json --stage1_weight stage1_cc3m.ckpt --test_weight stage2_vist.ckpt \
    --predict_batch_size 8 --max_new_tokens "$NEW_TOKENS" --num_inference_steps "$SD_STEPS" "${COMMON[@]}"
stage bench 420 $PY benchmarks/run.py --rows 4,5 --device "$DEVICE" --model_config "$CONFIG" $BENCH_FLAGS \
    --out "$DIR/RESULTS_gpu.md"
# Row 4 again with the LLM in float32: whether a batch reproduces its single calls token for token
# once bfloat16 rounding is out of the way.
if grep -q '^  llm: bfloat16$' "$CONFIG"; then
    sed 's/^  llm: bfloat16$/  llm: float32/' "$CONFIG" >"${CONFIG%.yaml}_llm_fp32.yaml"
    stage bench_llm_fp32 300 $PY benchmarks/run.py --rows 4 --device "$DEVICE" \
        --model_config "${CONFIG%.yaml}_llm_fp32.yaml" $BENCH_FLAGS --out "$DIR/RESULTS_gpu_llm_fp32.md"
fi

# The losses Lightning logged, for the summary.
for log in "$DIR"/stage1.log "$DIR"/stage2.log "$DIR"/predict.log; do
    grep -E "after [0-9]+ optimiser steps|predictions written" "$log" | tail -n 1 | sed "s|^|$(basename "$log" .log): |" >>"$SUMMARY"
done

exit $failed
