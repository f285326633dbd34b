#!/usr/bin/env python3
"""PyTorch + diffusers counterparts of `diffuse bench`, for side-by-side tables (benches/compare.sh).

The same model shapes as `diffuse bench`: SD 1.5's U-Net and VAE from configs/sd15/*.json with
random weights, and the pixel-DDPM U-Net of a `diffuse train` TOML config. Each run prints one
JSON object as its last line with median_s, min_s, max_s and peak_rss_mb, like `diffuse bench
--json`. Needs torch and diffusers (pip install torch diffusers); no download.

    python benches/pytorch_reference.py unet --size 256 --runs 3
    python benches/pytorch_reference.py vae-decode --size 512 --runs 2
    python benches/pytorch_reference.py text-encoder
    python benches/pytorch_reference.py train-pixel --runs 5
    python benches/pytorch_reference.py unet --size 512 --dtype bf16
    python benches/pytorch_reference.py txt2img --size 256 --steps 20 --runs 1
    python benches/pytorch_reference.py unet --size 512 --dtype f16 --device cuda
"""

import argparse
import json
import resource
import statistics
import time
import tomllib
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load_config(path):
    config = json.loads(Path(path).read_text())
    config.pop("_class_name", None)
    return config


def synchronize():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_runs(runs, step):
    """The FLOPs of one call (counted by PyTorch during the warm-up call: matrix products and
    convolutions, forward and backward) and the seconds of `runs` timed calls after it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return flops, times


def unet_step(args):
    config = load_config(args.config or ROOT / "configs/sd15/unet.json")
    model = UNet2DConditionModel(**config).eval().to(DTYPES[args.dtype])
    latent = args.size // 8
    x = torch.randn(2, config["in_channels"], latent, latent, dtype=DTYPES[args.dtype])
    context = torch.randn(2, 77, config.get("cross_attention_dim", 768), dtype=DTYPES[args.dtype])
    t = torch.tensor([500.0, 500.0])

    def step():
        with torch.inference_mode():
            model(x, t, encoder_hidden_states=context)

    return model, step


def vae_decode(args):
    config = load_config(args.config or ROOT / "configs/sd15/vae.json")
    model = AutoencoderKL(**config).eval().to(DTYPES[args.dtype])
    latent = args.size // 8
    z = torch.randn(1, config["latent_channels"], latent, latent, dtype=DTYPES[args.dtype])

    def step():
        with torch.inference_mode():
            model.decode(z)

    return model, step


def taesd_decode(args):
    from diffusers import AutoencoderTiny

    # madebyollin/taesd's config is AutoencoderTiny's defaults.
    config = load_config(args.config) if args.config else {}
    model = AutoencoderTiny(**config).eval().to(DTYPES[args.dtype])
    latent = args.size // 8
    z = torch.randn(1, model.config.latent_channels, latent, latent, dtype=DTYPES[args.dtype])

    def step():
        with torch.inference_mode():
            model.decode(z)

    return model, step


def text_encoder(args):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = load_config(args.config or ROOT / "configs/sd15/text_encoder.json")
    model = CLIPTextModel(CLIPTextConfig(**config)).eval().to(DTYPES[args.dtype])
    length = config["max_position_embeddings"]
    # The same token ids as `diffuse bench text-encoder`.
    ids = (torch.arange(2 * length) * 7919 % config["vocab_size"]).view(2, length)

    def step():
        with torch.inference_mode():
            model(input_ids=ids)

    return model, step


def txt2img(args):
    """A whole StableDiffusionPipeline call with random SD 1.5 weights, as `diffuse bench
    txt2img`: the prompt and the empty prompt encoded, --steps DDIM steps with guidance 7.5, one
    decode. The tokenizer is the real CLIP one in weights/tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dtype = DTYPES[args.dtype]
    text = CLIPTextModel(CLIPTextConfig(**load_config(ROOT / "configs/sd15/text_encoder.json")))
    unet = UNet2DConditionModel(**load_config(ROOT / "configs/sd15/unet.json"))
    vae = AutoencoderKL(**load_config(ROOT / "configs/sd15/vae.json"))
    scheduler = DDIMScheduler.from_config(load_config(ROOT / "configs/sd15/scheduler.json"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text.to(dtype),
        tokenizer=CLIPTokenizer.from_pretrained(ROOT / "weights/tokenizer"),
        unet=unet.to(dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # The VAE decodes in f32 whatever --dtype says, as in `diffuse bench txt2img`.
    decode = vae.decode
    vae.decode = lambda z, *rest, **kw: decode(z.float(), *rest, **kw)

    def step():
        with torch.inference_mode():
            pipe(
                "a photograph of an astronaut riding a horse",
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="np",
            )

    return torch.nn.ModuleList([text, unet, vae]), step


def pixel_unet(config):
    """The pixel-DDPM U-Net of a `diffuse train` config, as `TrainConfig::unet_config` builds it:
    DownBlock2D/UpBlock2D throughout and a mid block of two residual blocks without attention
    (diffusers' own "UNetMidBlock2D" mid block in this class has one)."""
    m = config["model"]
    channels = m["block_out_channels"]
    learned = config["diffusion"].get("variance") == "learned_range"
    model = UNet2DConditionModel(
        sample_size=m["image_size"],
        in_channels=m["channels"],
        out_channels=2 * m["channels"] if learned else m["channels"],
        block_out_channels=channels,
        down_block_types=["DownBlock2D"] * len(channels),
        up_block_types=["UpBlock2D"] * len(channels),
        mid_block_type=None,
        layers_per_block=m["layers_per_block"],
        norm_num_groups=m["norm_num_groups"],
        num_class_embeds=m.get("num_classes"),
    )
    model.mid_block = UNetMidBlock2D(
        in_channels=channels[-1],
        temb_channels=4 * channels[0],
        num_layers=1,
        resnet_groups=m["norm_num_groups"],
        add_attention=False,
    )
    return model


def train_pixel(args):
    """One step of `diffuse train`'s recipe: random timesteps, noised images, L_simple, backward,
    gradient clipping, AdamW and the EMA update."""
    config = tomllib.loads(Path(args.config or ROOT / "configs/ddpm-mnist.toml").read_text())
    model = pixel_unet(config).train()
    train = config["train"]
    batch = args.batch or train["batch_size"]
    size, channels = config["model"]["image_size"], config["model"]["channels"]
    classes = config["model"].get("num_classes")
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["learning_rate"])
    ema = [p.detach().clone() for p in model.parameters()]
    betas = torch.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = torch.cumprod(1 - betas, 0)

    def step():
        images = torch.rand(batch, channels, size, size) * 2 - 1
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(images)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        labels = torch.randint(0, classes, (batch,)) if classes else None
        prediction = model(noisy, t, encoder_hidden_states=None, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        optimizer.step()
        with torch.no_grad():
            for average, p in zip(ema, model.parameters()):
                average.lerp_(p, 1 - train["ema_decay"])

    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "component",
        choices=["unet", "vae-decode", "taesd-decode", "text-encoder", "train-pixel", "txt2img"],
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=20, help="txt2img: sampler steps")
    parser.add_argument("--config")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # Every model and input is made where it runs.
    torch.set_default_device(args.device)
    build = {
        "unet": unet_step,
        "vae-decode": vae_decode,
        "taesd-decode": taesd_decode,
        "text-encoder": text_encoder,
        "train-pixel": train_pixel,
        "txt2img": txt2img,
    }
    model, step = build[args.component](args)
    parameters = sum(p.numel() for p in model.parameters())
    flops, times = time_runs(args.runs, step)
    result = {
        "implementation": f"pytorch {torch.__version__}",
        "component": args.component,
        "size": args.size,
        "dtype": args.dtype,
        "threads": args.threads,
        "parameters": parameters,
        "runs": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "gflop": flops / 1e9,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": args.device,
    }
    if torch.cuda.is_initialized():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
