#!/usr/bin/env bash
# The whole MiniGPT-5 pipeline on the tiny preset and the repository's own datasets/ samples:
#   stage 1 (CC3M) -> stage 2 (VIST, from the stage-1 checkpoint)
#   -> prediction on CC3M, VIST and MMDialog -> metric.py on each.
# Everything goes under $OUT (default outputs/tiny_pipeline). Runs on a CPU in a few minutes.
# STEPS (default 4) sets the optimiser steps per stage; extra flags for train_eval.py can be given
# in TRAIN_FLAGS. The metrics use tiny random CLIP / Inception extractors (see metric.py
# --tiny_extractors): the numbers prove the plumbing, not the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-outputs/tiny_pipeline}
STEPS=${STEPS:-4}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
rm -rf "$OUT"
mkdir -p "$OUT"

$PY weights.py tiny "$OUT/tiny_weights" >/dev/null
CONFIG="$OUT/tiny_weights/tiny.yaml"
export WEIGHTFOLDER="$OUT/weights" OUTPUT_FOLDER="$OUT/predictions"
COMMON=(--model_config "$CONFIG" --accelerator cpu --num_workers 0 --per_device_train_batch_size 2
        --per_device_eval_batch_size 2 --real_batch_size 2 --warmup_steps 1 --learning_rate 1e-4
        --num_inference_steps 5 --max_new_tokens 32)

echo "== stage 1 on CC3M"
IS_STAGE2=False DATAFOLDER=datasets/CC3M $PY train_eval.py --is_training True \
    --train_data_path cc3m_train.tsv --val_data_path cc3m_val.tsv \
    --model_save_name stage1_cc3m --num_train_epochs 100 --max_steps "$STEPS" "${COMMON[@]}" $TRAIN_FLAGS

echo "== stage 2 on VIST, from stage 1"
IS_STAGE2=True DATAFOLDER=datasets/VIST $PY train_eval.py --is_training True \
    --train_data_path train_cleaned.json --val_data_path val_cleaned.json --stage1_weight stage1_cc3m.ckpt \
    --model_save_name stage2_vist --num_train_epochs 100 --max_steps "$STEPS" "${COMMON[@]}" $TRAIN_FLAGS

echo "== prediction"
IS_STAGE2=False DATAFOLDER=datasets/CC3M $PY train_eval.py --is_training False \
    --test_data_path cc3m_val.tsv --test_weight stage1_cc3m.ckpt "${COMMON[@]}"
for data in VIST MMDialog; do
    test_file=val_cleaned.json
    [ "$data" = MMDialog ] && test_file=test/test_conversations.txt
    OUTPUT_SUFFIX="_$data" IS_STAGE2=True DATAFOLDER="datasets/$data" $PY train_eval.py --is_training False \
        --test_data_path "$test_file" --stage1_weight stage1_cc3m.ckpt --test_weight stage2_vist.ckpt "${COMMON[@]}"
done

echo "== metrics"
# CC3M's FID real set is the release's: every .jpg under CC3M_FOLDER/val/ (datasets/CC3M/val/ here)
CC3M_FOLDER=datasets/CC3M DATAFOLDER=datasets/CC3M $PY metric.py --test_weight stage1_cc3m.ckpt --tiny_extractors \
    --device cpu
OUTPUT_SUFFIX=_VIST DATAFOLDER=datasets/VIST $PY metric.py --test_weight stage2_vist.ckpt --tiny_extractors --device cpu
OUTPUT_SUFFIX=_MMDialog DATAFOLDER=datasets/MMDialog $PY metric.py --test_weight stage2_vist.ckpt --tiny_extractors --device cpu
echo "tiny pipeline done: checkpoints in $WEIGHTFOLDER, predictions and results in $OUTPUT_FOLDER"
