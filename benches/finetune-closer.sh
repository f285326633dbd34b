#!/bin/bash
# Evidence that fine-tuning learns the pictures (issue 5): for each photo of
# ../shared/data/finetune-example, generate from its caption (seed 1, 20 steps, 128x128) with the
# base tiny-sd, a full fine-tune ($FULL, a diffusers folder) and a LoRA ($LORA), and print the
# per-pixel MSE of each to the photo resized and centre-cropped to 128 (needs pillow, numpy).
cd "$(dirname "$0")/.."
FULL=${FULL:?set FULL to a full fine-tune folder}; LORA=${LORA:?set LORA to a LoRA file}; OUT=${OUT:-/tmp/closer}
D=../shared/data/finetune-example
mkdir -p $OUT
for txt in $D/*.txt; do
  stem=$(basename $txt .txt); cap=$(cat $txt)
  ./target/release/txt2img --model tests/fixtures/tiny-sd --steps 20 --seed 1 --width 128 --height 128 -o $OUT/$stem-base.png "$cap" 2>/dev/null
  ./target/release/txt2img --model $FULL --steps 20 --seed 1 --width 128 --height 128 -o $OUT/$stem-full.png "$cap" 2>/dev/null
  ./target/release/txt2img --model tests/fixtures/tiny-sd --lora $LORA --steps 20 --seed 1 --width 128 --height 128 -o $OUT/$stem-lora.png "$cap" 2>/dev/null
done
export OUT
python3 - <<'P'
import glob, os, numpy as np
from PIL import Image
D="../shared/data/finetune-example"
def square(path, r=128):
    im=Image.open(path).convert("RGB"); w,h=im.size; s=r/min(w,h)
    im=im.resize((max(r,round(w*s)),max(r,round(h*s))), Image.BICUBIC); w,h=im.size
    l=(w-r)//2; t=(h-r)//2
    return np.asarray(im.crop((l,t,l+r,t+r)),dtype=np.float64)/255
rows={"base":[],"full":[],"lora":[]}
for txt in sorted(glob.glob(D+"/*.txt")):
    stem=os.path.basename(txt)[:-4]
    img=[f for f in glob.glob(f"{D}/{stem}.*") if not f.endswith(".txt")][0]
    ref=square(img)
    for k in rows:
        gen=np.asarray(Image.open(f"{os.environ.get('OUT', '/tmp/closer')}/{stem}-{k}.png").convert("RGB"),dtype=np.float64)/255
        rows[k].append(((gen-ref)**2).mean())
for k,v in rows.items(): print(k, "mean MSE %.4f"%np.mean(v), "closer than base on %d of %d"%(sum(a<b for a,b in zip(v,rows["base"])),len(v)))
P
