#!/usr/bin/env bash
# The README's speed table: `diffuse bench` and PyTorch + diffusers (benches/pytorch_reference.py)
# on the same shapes, interleaved in one run so that both see the same machine state.
#
#   PYTHON=/path/to/venv/bin/python benches/compare.sh [RUNS]     (needs: pip install torch diffusers)
#   DEVICE=cuda DIFFUSE=path/to/cuda/diffuse benches/compare.sh   (a `--features cuda` build: the GPU cases)
#
# Prints one Markdown row per case (median seconds, min-max, the achieved GFLOP/s from the FLOPs
# PyTorch counts for the same shapes, peak resident memory); the raw JSON
# lines go to target/compare.jsonl. Build first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUNS=${1:-3}
DIFFUSE=${DIFFUSE:-target/release/diffuse}
DEVICE=${DEVICE:-cpu}
OUT=target/compare.jsonl
[ -x "$DIFFUSE" ] || { echo "no $DIFFUSE: run cargo build --release first" >&2; exit 1; }
"$PYTHON" -c "import torch, diffusers" 2>/dev/null \
    || { echo "$PYTHON has no torch/diffusers: pip install torch diffusers, or set PYTHON" >&2; exit 1; }
: > "$OUT"

# case name | diffuse bench arguments | pytorch_reference.py arguments [| runs, default RUNS]
CASES=(
    "U-Net CFG step 256x256 f32|unet --size 256|unet --size 256"
    "U-Net CFG step 512x512 f32|unet --size 512|unet --size 512"
    "VAE decode 512x512 f32|vae-decode --size 512|vae-decode --size 512"
    "TAESD decode 512x512 f32|taesd-decode --size 512|taesd-decode --size 512"
    "CLIP text encoder, 2 x 77 tokens f32|text-encoder|text-encoder"
    "pixel-DDPM training step (MNIST config, batch 64)|train-pixel|train-pixel"
    "txt2img 256x256, 20 DDIM steps f32|txt2img --size 256|txt2img --size 256|1"
    # bf16 weights on both sides. diffuse: products through AVX512_BF16 where the CPU has it,
    # f32 activations between them; held as f32 where it has not. PyTorch: bf16 throughout.
    "U-Net CFG step 512x512 bf16|unet --size 512 --dtype bf16|unet --size 512 --dtype bf16"
    "VAE decode 512x512 bf16|vae-decode --size 512 --dtype bf16|vae-decode --size 512 --dtype bf16"
    "CLIP text encoder, 2 x 77 tokens bf16|text-encoder --dtype bf16|text-encoder --dtype bf16"
    # diffuse's 8-bit weights (ops/q8.rs) beside PyTorch's bf16: PyTorch has no CPU int8 path
    # for these models without a separate quantization toolkit.
    "U-Net CFG step 512x512 q8 (PyTorch bf16)|unet --size 512 --dtype q8|unet --size 512 --dtype bf16"
    "CLIP text encoder, 2 x 77 tokens q8 (PyTorch bf16)|text-encoder --dtype q8|text-encoder --dtype bf16"
)
if [ "$DEVICE" != cpu ]; then
    CASES=()
    for dtype in f32 f16 bf16; do
        CASES+=("U-Net CFG step 512x512 $dtype|unet --size 512 --dtype $dtype|unet --size 512 --dtype $dtype")
        CASES+=("txt2img 512x512, 20 DDIM steps $dtype|txt2img --size 512 --dtype $dtype|txt2img --size 512 --dtype $dtype")
    done
fi

# ONLY=PATTERN keeps the cases whose name matches (grep -E).
if [ -n "${ONLY:-}" ]; then
    kept=()
    for case in "${CASES[@]}"; do
        if grep -qE "$ONLY" <<< "${case%%|*}"; then kept+=("$case"); fi
    done
    CASES=("${kept[@]}")
fi

last_json() { grep '^{' | tail -1; }

echo "| case | GFLOP | diffuse (s) | PyTorch + diffusers (s) | diffuse / PyTorch | GFLOP/s diffuse / PyTorch | peak RSS diffuse / PyTorch (MiB) |"
echo "|---|---|---|---|---|---|---|"
for case in "${CASES[@]}"; do
    IFS='|' read -r name ours theirs runs <<< "$case"
    runs=${runs:-$RUNS}
    # shellcheck disable=SC2086
    ours_json=$("$DIFFUSE" bench $ours --device "$DEVICE" --runs "$runs" --json 2>/dev/null | last_json)
    # shellcheck disable=SC2086
    theirs_json=$("$PYTHON" benches/pytorch_reference.py $theirs --device "$DEVICE" --runs "$runs" 2>/dev/null | last_json)
    printf '{"case": "%s", "implementation": "diffuse", "result": %s}\n' "$name" "$ours_json" >> "$OUT"
    printf '{"case": "%s", "implementation": "pytorch", "result": %s}\n' "$name" "$theirs_json" >> "$OUT"
    "$PYTHON" - "$name" "$ours_json" "$theirs_json" <<'EOF'
import json, sys
name, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
cell = lambda r: f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})"
gflop = theirs["gflop"]
print(f"| {name} | {gflop:.1f} | {cell(ours)} | {cell(theirs)} | {ours['median_s'] / theirs['median_s']:.2f} "
      f"| {gflop / ours['median_s']:.0f} / {gflop / theirs['median_s']:.0f} "
      f"| {ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} |")
EOF
done
echo
if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; fi
echo "CPU features: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|fma|f16c|avx_vnni|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8' | xargs)"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $RUNS runs$([ "$DEVICE" = cpu ] && echo ' (txt2img: 1)') after one warm-up, medians; $("$PYTHON" -c 'import torch, diffusers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")')"
