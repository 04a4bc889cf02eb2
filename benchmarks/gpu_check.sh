#!/usr/bin/env bash
# Everything a lent GPU must show, in at most 8 minutes on one H100/H200 whose image has Python 3.12 and a CUDA
# torch but no network: `bash benchmarks/gpu_check.sh OUTDIR` from the repository root, with the wheelhouse of
# `make gpu-wheels` (gpu-wheels/, ~27 MiB) beside it. Each part runs under its own time limit, so one failure
# does not lose the rest. OUTDIR gets summary.md (the table), gpu_check.json, log.txt and each part's JSON/CSV.
#
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR     # on any machine: the plan, the wheelhouse and its size
#   GPU_CHECK_SMALL=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUTDIR   # a CPU rehearsal, tiny sizes
#
# Parts: install (the wheels into a --target folder), env, gpu_tests (pytest -m gpu: FlashAttention vs math in
# bf16), train_throughput (B and XL, 16 × 256², bf16, compiled, batch 8: clips/s, MFU, peak memory), data (256²
# synthetic faces -> shards through a random SD-VAE-size VAE), zero2_fit (30 steps of B, ZeRO-2, one GPU),
# generate_speed (that model at 256², 25 steps) and vae_encode (--size 512).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_WHEELS:-$REPO/gpu-wheels}
PY=${PYTHON:-python3}
MAX_WHEELS_MIB=60
BUDGET_S=480
WORK=${GPU_CHECK_WORK:-/tmp/letstalk-gpu-check}
SITE=$WORK/site

if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then  # CPU rehearsal: same commands, sizes a CPU finishes
    SIZES="tiny"; BATCH=1; FRAMES=4; LATENT=8; PX=64; FIT_SIZE=tiny; FIT_STEPS=6; GEN_STEPS=2; VAE_PX=64
    COMPILE=off; DEVICE=cpu; MARK="gpu"; VAE="--small"; VAE_FRAMES=8; SLOWER=4  # a 2-core CPU: 4x the limits
else
    SIZES="B XL"; BATCH=8; FRAMES=16; LATENT=32; PX=256; FIT_SIZE=b; FIT_STEPS=30; GEN_STEPS=25; VAE_PX=512
    COMPILE=on; DEVICE=cuda; MARK="gpu"; VAE=""; VAE_FRAMES=64; SLOWER=1
fi

PARTS=(install env gpu_tests train_throughput data zero2_fit generate_speed vae_encode)
declare -A LIMIT=([install]=30 [env]=15 [gpu_tests]=45 [train_throughput]=150 [data]=60 [zero2_fit]=90
                  [generate_speed]=60 [vae_encode]=30)
declare -A COMMAND=(
    [install]="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
    [env]="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY benchmarks/gpu_check.py env"
    [gpu_tests]="$PY -m pytest -q -p no:cacheprovider -m $MARK tests/test_model.py"
    [train_throughput]="$PY benchmarks/train_throughput.py --sizes $SIZES --batch $BATCH --frames $FRAMES --latent $LATENT --compile $COMPILE --steps 8 --warmup 2 --device $DEVICE --json $OUT/train_throughput.json"
    [data]="$PY -m pipeline.cli synth --out $WORK/videos --clips 4 --seconds 2 --size $PX && $PY -m pipeline.cli synth --out $WORK/demo/heldout --clips 1 --seconds 2 --size $PX --seed 10000 && $PY benchmarks/gpu_check.py sd-vae $WORK/vae $VAE && $PY -m pipeline.cli prepare $WORK/videos --out $WORK/shards --vae $WORK/vae --size $PX --segment-seconds 2 --device $DEVICE"
    [zero2_fit]="$PY -m pipeline.cli fit --config configs/base.yaml --config configs/model/$FIT_SIZE.yaml --config configs/trainer/zero2.yaml --config benchmarks/gpu_check.yaml --data.root $WORK/shards --data.clip_frames $((FRAMES < 16 ? FRAMES : 16)) --trainer.max_steps $FIT_STEPS --trainer.default_root_dir $WORK/fit --trainer.accelerator $DEVICE && cp $WORK/fit/logs/version_0/metrics.csv $OUT/fit_metrics.csv && $PY -m pipeline.cli export $WORK/fit/checkpoints/last.ckpt --ema --out $WORK/model.safetensors"
    [generate_speed]="$PY benchmarks/generate_speed.py --demo $WORK/demo --checkpoint $WORK/model.safetensors --samplers euler --steps $GEN_STEPS --guidance on --device $DEVICE --json $OUT/generate_speed.json"
    [vae_encode]="$PY benchmarks/vae_encode.py --size $VAE_PX --frames $VAE_FRAMES --device $DEVICE --json $OUT/vae_encode.json"
)

plan() {
    local total=0
    echo "gpu_check plan (limits sum to at most ${BUDGET_S} s):"
    for part in "${PARTS[@]}"; do
        printf '  %-17s %4s s  %s\n' "$part" "${LIMIT[$part]}" "${COMMAND[$part]}"
        total=$((total + LIMIT[$part]))
    done
    echo "  total             $total s"
    [ "$total" -le "$BUDGET_S" ] || { echo "error: the limits sum to $total s, over ${BUDGET_S} s"; return 1; }
}

check_wheels() {  # every package of benchmarks/gpu_wheels.txt has a wheel, and the wheelhouse fits a device call
    local missing=() name size
    [ -d "$WHEELS" ] || { echo "error: no wheelhouse at $WHEELS: run make gpu-wheels"; return 1; }
    echo "wheelhouse $WHEELS:"
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] && awk -v b="$(stat -c %s "$wheel")" -v n="$(basename "$wheel")" \
            'BEGIN { printf "  %8.2f MiB  %s\n", b / 1048576, n }'
    done
    while read -r name; do
        name=$(echo "${name%%==*}" | tr 'A-Z-' 'a-z_')
        ls "$WHEELS" | tr 'A-Z-' 'a-z_' | grep -q "^${name}_[0-9]" || missing+=("$name")
    done < <(grep -v '^#' "$REPO/benchmarks/gpu_wheels.txt" | sed 's/ *#.*//' | grep .)
    size=$(du -sm --apparent-size "$WHEELS" | cut -f1)
    echo "  total ${size} MiB (limit ${MAX_WHEELS_MIB} MiB)"
    [ ${#missing[@]} -eq 0 ] || { echo "error: no wheel for: ${missing[*]} (run make gpu-wheels)"; return 1; }
    [ "$size" -le "$MAX_WHEELS_MIB" ] || { echo "error: the wheelhouse is ${size} MiB, over ${MAX_WHEELS_MIB} MiB"; return 1; }
}

if [ "$DRY" = 1 ]; then
    status=0
    plan || status=1
    check_wheels || status=1
    echo "outputs: $OUT/{summary.md,gpu_check.json,log.txt,train_throughput.json,fit_metrics.csv,generate_speed.json,vae_encode.json}"
    exit $status
fi

mkdir -p "$OUT" "$WORK"
cd "$REPO"
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
LOG=$OUT/log.txt
: > "$LOG"
: > "$WORK/status"
for part in "${PARTS[@]}"; do
    if [ "$part" = install ] && [ ! -d "$WHEELS" ]; then
        echo "install skipped 0" >> "$WORK/status"; continue
    fi
    echo "=== $part (limit ${LIMIT[$part]} s): ${COMMAND[$part]}" | tee -a "$LOG"
    start=$(date +%s)
    timeout --signal=INT --kill-after=10 "$((LIMIT[$part] * SLOWER))" bash -c "${COMMAND[$part]}" >> "$LOG" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    case $rc in 0) state=ok ;; 124|137) state=timeout ;; *) state="failed($rc)" ;; esac
    echo "$part $state $seconds" >> "$WORK/status"
    echo "--- $part: $state in ${seconds} s" | tee -a "$LOG"
done
"$PY" benchmarks/gpu_check.py summary "$WORK/status" "$OUT" | tee -a "$LOG"
