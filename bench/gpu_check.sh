#!/usr/bin/env bash
# The GPU path in one command (<= ~10 min on one CUDA GPU), writing one report file:
#
#   bash bench/gpu_check.sh                          # --device cuda: ViT-B/32 + GPT-2 124M, full size
#   bash bench/gpu_check.sh --device cpu             # the same stages, tiny models and few steps (CI: tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --out DIR --data ../shared/data/coco_mini --tokenizer ../shared/data/gpt2_tokenizer
#
# Random weights saved as a user has them (bench/user_weights.py: OpenAI's TorchScript CLIP .pt and a
# save_pretrained GPT-2) run through the entry points on coco_mini: extract -> train (bf16-mixed, fused
# AdamW, pinned memory) -> train again with model.compile=true -> evaluate -> caption, then
# bench/train.py and bench/decode.py on the same device. Each stage's command, exit status, wall time
# and output tail go to DIR/report.md; the script stops at the first failing stage (its tail says why)
# and exits with its status.
set -uo pipefail

DEVICE=cuda
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/outputs/gpu_check
DATA=$ROOT/../shared/data/coco_mini
TOKENIZER=$ROOT/../shared/data/gpt2_tokenizer
PYTHON=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --tokenizer) TOKENIZER=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "error: --device $DEVICE: choose cuda or cpu" >&2; exit 2 ;; esac
[ -d "$DATA/annotations" ] || { echo "error: coco_mini is not at $DATA: pass --data DIR" >&2; exit 2; }
[ -f "$TOKENIZER/vocab.json" ] || { echo "error: GPT-2's vocab.json is not in $TOKENIZER: pass --tokenizer DIR" >&2; exit 2; }
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: --device cuda but torch sees no GPU: run on a GPU machine or pass --device cpu" >&2; exit 2; }
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 WANDB_MODE=offline
mkdir -p "$OUT"
REPORT=$OUT/report.md
cd "$ROOT"

# what differs by device: the sizes, the step counts, and the trainer
if [ "$DEVICE" = cuda ]; then
  SMALL=""; STEPS=60; TRAINER="trainer=gpu"; PIN=true; BATCH=40; TOKENS=20
  BENCH_TRAIN=(--device cuda --setting mlp transformer --rounds 1 --windows 5 --window-steps 5)
  BENCH_DECODE=(--device cuda --runs 5 --images 64)
else
  SMALL=--small; STEPS=3; TRAINER="trainer=cpu trainer.precision=bf16-mixed"; PIN=false; BATCH=8; TOKENS=5
  BENCH_TRAIN=(--device cpu --setting mlp --rounds 1 --windows 1 --warmup 1 --count 1)
  BENCH_DECODE=(--device cpu --runs 1 --warmup 0 --tokens 4 --only latency --no-onnx)
fi

{
  echo "# GPU check: $DEVICE"
  echo
  echo "- date: $(date -u +%FT%TZ); host: $(hostname); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" -c "import torch; g = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {g}')"
  echo "- models: $([ -n "$SMALL" ] && echo 'tiny CLIP + tiny GPT-2 (CPU check)' || echo 'ViT-B/32 + GPT-2 124M'), random weights saved as a user has them"
  echo
} > "$REPORT"

stage() {  # stage NAME COMMAND...: run it, append its status, time and output tail to the report
  local name=$1; shift
  local log=$OUT/$(echo "$name" | tr ' /' '__').log start=$SECONDS
  echo "== $name"
  "$@" > "$log" 2>&1
  local rc=$?
  {
    echo "## $name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
    echo
    echo '```'
    echo "\$ $*"
    tail -n "$([ $rc = 0 ] && echo 25 || echo 60)" "$log"
    echo '```'
    echo
  } >> "$REPORT"
  if [ $rc != 0 ]; then
    echo "FAILED: $name (exit $rc); see $REPORT" >&2
    exit $rc
  fi
}

W=$OUT/weights
stage "user weights" "$PYTHON" bench/user_weights.py --out "$W" --tokenizer "$TOKENIZER" $SMALL
COMMON=(experiment=coco_attn data=karpathy
        "data.splits.train.file=$DATA/annotations/dataset_coco_mini_karpathy_format.json" "data.splits.train.images=$DATA/images"
        "data.cache_dir=$OUT/features" data.num_workers=2 "data.pin_memory=$PIN" "data.batch_size=$BATCH"
        "model.encoder=$W/ViT-B-32.pt" "model.decoder=$W/gpt2" "model.tokenizer=$W/gpt2"
        $TRAINER logger=csv)
TRAIN=(+model.adamw=fused "trainer.max_steps=$STEPS" trainer.limit_val_batches=1 model.val_cider_images=4 "model.val_decoding.max_new_tokens=$TOKENS"
       score=false score_meteor=false)
stage "extract" "$PYTHON" -m captioner.extract "${COMMON[@]}" "hydra.run.dir=$OUT/extract"
stage "train (bf16-mixed, fused AdamW, pinned memory)" "$PYTHON" -m captioner.train "${COMMON[@]}" "${TRAIN[@]}" "hydra.run.dir=$OUT/train"
if [ "$DEVICE" = cuda ]; then  # torch.compile on a CPU takes minutes of C++ compilation for a few steps
  stage "train (model.compile=true)" "$PYTHON" -m captioner.train "${COMMON[@]}" "${TRAIN[@]}" +model.compile=true "hydra.run.dir=$OUT/train_compiled"
fi
CKPT=$OUT/train/checkpoints/last.ckpt
# the checkpoint names a TorchScript CLIP file (as OpenAI ships it): loading it runs code, so it is named here
stage "evaluate (test split)" "$PYTHON" -m captioner.evaluate "ckpt_path=$CKPT" "encoder=$W/ViT-B-32.pt" split=test "device=$DEVICE" \
  decoding.strategy=beam decoding.num_beams=3 "decoding.max_new_tokens=$TOKENS" meteor=false "hydra.run.dir=$OUT/evaluate"
PHOTOS=$(find "$DATA/images" -name '*.jpg' | sort | head -n 4)
stage "caption (4 photos)" "$PYTHON" -m captioner.caption --ckpt "$CKPT" --encoder "$W/ViT-B-32.pt" --device "$DEVICE" --max-new-tokens "$TOKENS" \
  -o "$OUT/captions.jsonl" $PHOTOS
stage "bench/train.py" "$PYTHON" bench/train.py "${BENCH_TRAIN[@]}"
stage "bench/decode.py" "$PYTHON" bench/decode.py --tokenizer "$TOKENIZER" "${BENCH_DECODE[@]}"
echo "all stages passed in $SECONDS s" >> "$REPORT"
echo "wrote $REPORT ($SECONDS s)"
