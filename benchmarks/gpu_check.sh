#!/usr/bin/env bash
# DP-SGD overhead on a CUDA GPU (issue 22): SD-1.5-shaped UNet at 64x64 latents, SDXL-shaped UNet at
# 128x128, DiT-XL/2 at 32x32 (random init from the configs in benchmarks/_overhead_models.py); LoRA and
# attention; fp32 and bf16. Writes images/s, DP/non-DP step time and peak-memory
# (torch.cuda.max_memory_allocated) ratios to $OUT/gpu_results.md. Whole run < 8 min on one H200.
#
# The lent H200 machine (/work/.library/device/) has torch, transformers, peft, accelerate, but not
# diffusers or opacus, and no network. So, in three steps:
#   1. here, once:        bash benchmarks/gpu_check.sh --prepare
#                         (packs diffusers, opacus, importlib_metadata from .venv into .gpu_carry/site.tar.gz,
#                          and adds /.gpu_carry/ to .git/info/exclude)
#   2. on the GPU:        device run, carry [".gpu_carry"], command: bash benchmarks/gpu_check.sh
#   3. CPU dry run:       bash benchmarks/gpu_check.sh --dry_run   (same python calls, scaled-down shapes)
# Real model sizes (issue 39), instead of the overhead run: bash benchmarks/gpu_check.sh --real_shapes
#   benchmarks/real_shapes.py on the GPU: SD-1.5 / SDXL UNets, PixArt-alpha 1024 transformer, bf16 frozen weights,
#   LoRA / attention, with and without gradient checkpointing, batch 1 and 4; peak torch.cuda.max_memory_allocated
#   beside the memory plan, DP / non-DP step time -> $OUT/real_shapes.md (+ .json, log). < 6 min on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-gpu}"
CARRY=.gpu_carry

if [[ "$MODE" == "--prepare" ]]; then
    PY=.venv/bin/python
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$CARRY"
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    members=()
    for pkg in diffusers opacus importlib_metadata; do
        members+=("$pkg")
        members+=($(cd "$SITE" && ls -d "$pkg"-*.dist-info 2>/dev/null || true))
    done
    tar -C "$SITE" --exclude='__pycache__' --exclude='*.pyc' -czf "$CARRY/site.tar.gz" "${members[@]}"
    ls -la "$CARRY"
    exit 0
fi

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if [[ "$MODE" == "--real_shapes" ]]; then
    PY="${PY:-python3}"
    if [[ -f "$CARRY/site.tar.gz" ]]; then
        mkdir -p /tmp/dp_site && tar -C /tmp/dp_site -xzf "$CARRY/site.tar.gz"
        export PYTHONPATH="/tmp/dp_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/real_shapes_gpu.txt" 2>&1 || true
    ROWS=(sd15:lora:1:0 sd15:lora:4:0 sd15:attention:4:0 sd15:attention:4:1 sdxl:lora:1:1 sdxl:lora:4:0
          sdxl:attention:1:1 pixart:lora:4:0:128 pixart:attention:4:1:128)
    set +e
    timeout 330 "$PY" benchmarks/real_shapes.py --device cuda --rows "${ROWS[@]}" --repeats 3 --max_gib 70 \
        --row_timeout 120 --out_md "$OUT/real_shapes.md" --json "$OUT/real_shapes.json" > "$OUT/log_real_shapes.txt" 2>&1
    echo "real_shapes exit $?" >> "$OUT/real_shapes_gpu.txt"
    set -e
    cat "$OUT/real_shapes_gpu.txt" "$OUT/real_shapes.md" 2>/dev/null || tail -n 20 "$OUT/log_real_shapes.txt"
    exit 0
fi
if [[ "$MODE" == "--dry_run" ]]; then
    PY="${PY:-.venv/bin/python}"
    DEVICE=cpu
    EXTRA=(--dry_run --pairs 1 --warmup 0)
    SPECS=("sd15:16:2" "sdxl:16:2" "dit:8:2")
    LIMITS=(300 300 120)
else
    PY="${PY:-python3}"
    DEVICE=cuda
    EXTRA=(--pairs 4 --warmup 1 --threads 8)
    SPECS=("sd15:64:16" "sdxl:128:4" "dit:32:32")
    LIMITS=(130 200 80)  # seconds per shape; with the profile, install and start-up the whole run stays < 8 min
    if [[ -f "$CARRY/site.tar.gz" ]]; then
        mkdir -p /tmp/dp_site && tar -C /tmp/dp_site -xzf "$CARRY/site.tar.gz"
        export PYTHONPATH="/tmp/dp_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo '?')
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
VERSIONS=$("$PY" -c 'import torch, diffusers, opacus, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "opacus", opacus.__version__, "peft", peft.__version__)')
# $OUT brings back at most 8 files: gpu_results.md, one log and one json per shape, one profile
printf '# DP overhead on %s (%s)\n\n%s\n\n' "$DEVICE" "${GPU_NAME:-no GPU}" "$VERSIONS" > "$OUT/gpu_results.md"
for i in "${!SPECS[@]}"; do
    spec="${SPECS[$i]}"
    name="${spec%%:*}"
    set +e
    timeout "${LIMITS[$i]}" "$PY" benchmarks/dp_overhead.py --gpu --device "$DEVICE" --gpu_specs "$spec" \
        --methods lora attention --precisions fp32 bf16 "${EXTRA[@]}" \
        --out_md "$OUT/part_$name.md" --json "$OUT/part_$name.json" > "$OUT/log_$name.txt" 2>&1
    rc=$?
    set -e
    echo "## $spec (exit $rc)" >> "$OUT/gpu_results.md"
    if [[ -f "$OUT/part_$name.md" ]]; then
        # keep the table only; the header paragraph is the same for every shape
        sed -n '/^| model/,$p' "$OUT/part_$name.md" >> "$OUT/gpu_results.md"
        rm -f "$OUT/part_$name.md"
    else
        echo "no table (timed out or failed); rows finished before that:" >> "$OUT/gpu_results.md"
        grep '^{' "$OUT/log_$name.txt" >> "$OUT/gpu_results.md" || true
        tail -n 5 "$OUT/log_$name.txt" >> "$OUT/gpu_results.md"
    fi
    echo >> "$OUT/gpu_results.md"
done
# where the DP step's extra time goes on this device: per kernel, DP minus non-DP, the SD-1.5 attention row
PROFILE_SPEC="${SPECS[0]}"
set +e
timeout 60 "$PY" benchmarks/dp_overhead.py --gpu --device "$DEVICE" --gpu_specs "$PROFILE_SPEC" --methods attention \
    --precisions bf16 "${EXTRA[@]}" --profile "*/attention/auto/bf16" > "$OUT/profile_attention.txt" 2>&1
echo "## per-op profile of $PROFILE_SPEC attention bf16 (exit $?): profile_attention.txt" >> "$OUT/gpu_results.md"
set -e
cat "$OUT/gpu_results.md"
