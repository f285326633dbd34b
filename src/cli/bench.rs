//! `diffuse bench`: times model components with random weights of real shapes (SD 1.5 by
//! default), so no download is needed.

use crate::model::config::{UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Component {
    /// One classifier-free-guidance U-Net step (batch 2, 77 tokens).
    Unet,
    /// One VAE decode.
    VaeDecode,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub component: Component,
    /// Image size in pixels (square).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A diffusers config.json to benchmark instead of SD 1.5's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// SD 1.5's U-Net (stable-diffusion-v1-5, unet/config.json).
pub const SD15_UNET: &str = r#"{"in_channels": 4, "out_channels": 4, "sample_size": 64,
  "block_out_channels": [320, 640, 1280, 1280],
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32}"#;

/// SD 1.5's VAE (vae/config.json).
pub const SD15_VAE: &str = r#"{"in_channels": 3, "out_channels": 3, "latent_channels": 4,
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 0.18215}"#;

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size >= 8 && args.size.is_multiple_of(8),
        "--size = {} is not allowed; expected a positive multiple of 8",
        args.size
    );
    anyhow::ensure!(
        args.runs >= 1,
        "--runs = 0 is not allowed; expected at least 1"
    );
    let dtype = super::parse_dtype("--dtype", &args.dtype)?;
    let device = Device::Cpu;
    let config_text = match &args.config {
        Some(path) => std::fs::read_to_string(path)?,
        None => match args.component {
            Component::Unet => SD15_UNET.to_string(),
            Component::VaeDecode => SD15_VAE.to_string(),
        },
    };
    // Random weights are drawn into training variables, then handed over as plain tensors:
    // a forward pass over variables would record its whole graph for a backward pass.
    let build_start = Instant::now();
    let varmap = VarMap::new();
    match args.component {
        Component::Unet => {
            UNet2DConditionModel::new(
                serde_json::from_str(&config_text)?,
                VarBuilder::from_varmap(&varmap, dtype, &device),
            )?;
        }
        Component::VaeDecode => {
            AutoencoderKL::new(
                serde_json::from_str(&config_text)?,
                VarBuilder::from_varmap(&varmap, dtype, &device),
            )?;
        }
    }
    let weights: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("VarMap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    drop(varmap);
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    let vb = VarBuilder::from_tensors(weights, dtype, &device);
    let latent = args.size / 8;
    let mut step: Box<dyn FnMut() -> candle_core::Result<Tensor>> = match args.component {
        Component::Unet => {
            let config: UNetConfig = serde_json::from_str(&config_text)?;
            let context_dim = config.cross_attention_dim.unwrap_or(768);
            let channels = config.in_channels;
            let unet = UNet2DConditionModel::new(config, vb)?;
            let x =
                Tensor::randn(0f32, 1., (2, channels, latent, latent), &device)?.to_dtype(dtype)?;
            let context =
                Tensor::randn(0f32, 1., (2, 77, context_dim), &device)?.to_dtype(dtype)?;
            let t = Tensor::new(&[500f32, 500.], &device)?;
            Box::new(move || unet.forward(&x, &t, Some(&context), None))
        }
        Component::VaeDecode => {
            let config: VaeConfig = serde_json::from_str(&config_text)?;
            let channels = config.latent_channels;
            let vae = AutoencoderKL::new(config, vb)?;
            let z =
                Tensor::randn(0f32, 1., (1, channels, latent, latent), &device)?.to_dtype(dtype)?;
            Box::new(move || vae.decode(&z))
        }
    };
    eprintln!(
        "{:?} at {size}x{size}: {:.1} M parameters, built in {:.1} s",
        args.component,
        params as f64 / 1e6,
        build_start.elapsed().as_secs_f64(),
        size = args.size
    );
    step()?; // warm-up
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    let peak = peak_rss_mb();
    println!(
        "{:?} {}x{} {}: median {median:.3} s, min {min:.3} s, max {max:.3} s over {} runs, peak RSS {peak:.0} MiB",
        args.component, args.size, args.size, args.dtype, args.runs
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "component": format!("{:?}", args.component),
                "size": args.size,
                "dtype": args.dtype,
                "runs": times,
                "median_s": median,
                "min_s": min,
                "max_s": max,
                "peak_rss_mb": peak,
                "parameters": params,
            })
        );
    }
    Ok(())
}
