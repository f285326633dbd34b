#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, from binaries built elsewhere with
# `--features cuda` (see README "On an NVIDIA GPU"):
#
#   tests/cuda/run.sh DIR        DIR holds `diffuse` and `cuda_parity` (the test binary of
#                                tests/cuda_parity.rs, from `cargo test --release --features cuda
#                                --test cuda_parity --no-run`)
#
# 1. tests/cuda_parity.rs: the tiny SD 1.x and SDXL fixtures on the GPU against the CPU and
#    diffusers (text-to-image, img2img, f16/bf16).
# 2. `diffuse txt2img --device auto` picks the GPU and says so.
# 3. A few steps of `diffuse finetune --device cuda` (LoRA) on a generated captioned folder.
# 4. With PyTorch + diffusers beside it: benches/compare.sh's GPU cases (U-Net step and 20-step
#    txt2img at 512x512 in f32, f16 and bf16), interleaved.
# Logs go to ${OUT:-target/cuda-check}; images and the fine-tuning run to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${1:?usage: tests/cuda/run.sh DIR}")
OUT=${OUT:-target/cuda-check}
# A binary linked against an empty libcuda stub (README "On an NVIDIA GPU") finds the driver's
# symbols this way; for one linked against the driver it changes nothing.
export LD_PRELOAD=${LD_PRELOAD:-libcuda.so.1}
WORK=$(mktemp -d)
mkdir -p "$OUT" target
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=0

echo "== 1. cuda_parity"
# The test binary finds its fixtures under the folder it was built in (BUILT_IN).
built_in=${BUILT_IN:-/work/main}
if [ ! -e "$built_in" ]; then mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"; fi
"$BIN/cuda_parity" --test-threads 1 --nocapture 2>&1 | tee "$OUT/cuda_parity.log" || status=1

echo "== 2. txt2img --device auto"
"$BIN/diffuse" txt2img --model tests/fixtures/tiny-sdxl --steps 4 --seed 1 --output "$WORK/auto.png" "a cat" \
    2>&1 | tee "$OUT/auto.log"
grep -q "device: cuda:0" "$OUT/auto.log" || { echo "auto did not pick the GPU"; status=1; }

echo "== 3. finetune --device cuda"
python3 - "$WORK/captioned" <<'PY'
import sys, pathlib
from PIL import Image
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30))]):
    Image.new("RGB", (128, 128), colour).save(d / f"{i}.png")
    (d / f"{i}.txt").write_text(f"a {name} square")
PY
"$BIN/diffuse" finetune --device cuda --model tests/fixtures/tiny-sd --data "$WORK/captioned" --out-dir "$WORK/finetune" \
    --steps 6 --lora-rank 4 --checkpoint-every 3 --json 2>&1 | tee "$OUT/finetune.log" | tail -3 || status=1

echo "== 4. compare.sh on the GPU"
if python3 -c "import torch, diffusers" 2>/dev/null; then
    DEVICE=cuda DIFFUSE="$BIN/diffuse" benches/compare.sh "${RUNS:-3}" 2>&1 | tee "$OUT/compare.md"
    cp target/compare.jsonl "$OUT/" 2>/dev/null
else
    echo "no torch/diffusers here: the speed comparison is skipped"
fi
exit $status
