//! `diffuse finetune`: fine-tunes a Stable Diffusion U-Net on a folder of captioned images,
//! fully or with LoRA, and writes what `txt2img --model` or `--lora` loads.

use crate::data::folder::{FolderOptions, ImageFolder, MissingCaption};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::train::finetune::{FineTuner, FinetuneSettings};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// The model to start from: a diffusers folder, a hub id or a short name (sd15, sd-turbo...).
    #[arg(long)]
    pub model: String,
    /// The folder of images with captions (metadata.jsonl or <stem>.txt).
    #[arg(long)]
    pub data: PathBuf,
    /// Where the result goes: <out>/pytorch_lora_weights.safetensors for LoRA, a whole diffusers
    /// folder for a full fine-tune.
    #[arg(long)]
    pub out: PathBuf,
    /// Train LoRA adapters of this rank on the attention projections instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Training size in pixels, square (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<u32>,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Peak learning rate (default 1e-4 for LoRA, 1e-5 for a full fine-tune).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One caption for every image (DreamBooth-style instance prompt), instead of their own.
    #[arg(long)]
    pub caption: Option<String>,
    /// Skip images without a caption instead of stopping.
    #[arg(long)]
    pub skip_uncaptioned: bool,
    /// Save <out>/checkpoint.safetensors (trainable weights, optimiser state, step) this often,
    /// and on Ctrl-C.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue from <out>/checkpoint.safetensors (same settings) up to --steps.
    #[arg(long)]
    pub resume: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.steps > 0,
        "--steps = 0 is not allowed; expected at least 1"
    );
    let folder = ImageFolder::scan(
        &args.data,
        &FolderOptions {
            caption: args.caption.clone(),
            missing_caption: if args.skip_uncaptioned {
                MissingCaption::Skip
            } else {
                MissingCaption::Fail
            },
        },
    )?;
    let root = crate::hub::resolve(&args.model, false)?;
    let sd = StableDiffusion::load_dir(&root, LoadOptions::default())
        .with_context(|| format!("loading {}", root.display()))?;
    let resolution = match args.resolution {
        Some(r) => r,
        None => (sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor()) as u32,
    };
    let lora = args.lora_rank.is_some();
    let settings = FinetuneSettings {
        resolution,
        lora_rank: args.lora_rank,
        learning_rate: args.learning_rate.unwrap_or(if lora { 1e-4 } else { 1e-5 }),
        warmup_steps: args.warmup_steps,
        batch_size: args.batch_size,
        grad_clip: args.grad_clip,
        seed: args.seed,
    };
    eprintln!(
        "encoding {} images at {resolution}x{resolution} ({} skipped while scanning, {} other files ignored)",
        folder.examples.len(),
        folder.skipped.len(),
        folder.ignored
    );
    let (mut tuner, decode_skipped) = FineTuner::new(&sd, &root.join("unet"), &folder, settings)?;
    let skipped: Vec<_> = folder.skipped.iter().chain(&decode_skipped).collect();
    for s in &skipped {
        eprintln!("skipped {}: {}", s.path.display(), s.reason);
    }
    eprintln!(
        "{} fine-tuning: {:.2} M trainable parameters on {} images",
        if lora { "LoRA" } else { "full" },
        tuner.trainable_parameters() as f64 / 1e6,
        tuner.examples()
    );
    let checkpoint = args.out.join("checkpoint.safetensors");
    let loss_before = tuner.denoising_loss()?;
    if args.resume {
        anyhow::ensure!(
            checkpoint.exists(),
            "--resume: {} does not exist (nothing to continue)",
            checkpoint.display()
        );
        tuner.resume_from(&checkpoint)?;
        eprintln!("resuming at step {}", tuner.step);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed (tests call run twice); the first one stays.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_position(tuner.step.min(args.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} loss {msg} [{elapsed_precise} < {eta_precise}, {per_sec}]",
        )
        .expect("progress template"),
    );
    let start = Instant::now();
    let mut recent = Vec::new();
    let first_step = tuner.step;
    while tuner.step < args.steps {
        recent.push(tuner.train_step()?);
        if interrupted.load(Ordering::SeqCst) {
            bar.suspend(|| eprintln!("interrupted: saving step {}", tuner.step));
            tuner.save_checkpoint(&checkpoint)?;
            anyhow::bail!(
                "interrupted at step {}; {} is saved, continue with --resume",
                tuner.step,
                checkpoint.display()
            );
        }
        if args.checkpoint_every > 0 && tuner.step % args.checkpoint_every == 0 {
            tuner.save_checkpoint(&checkpoint)?;
        }
        if recent.len() > 20 {
            recent.remove(0);
        }
        bar.set_message(format!(
            "{:.4}",
            recent.iter().sum::<f64>() / recent.len() as f64
        ));
        bar.inc(1);
    }
    bar.finish();
    tuner.save_checkpoint(&checkpoint)?;
    let steps_run = (tuner.step - first_step).max(1);
    let seconds = start.elapsed().as_secs_f64();
    let loss_after = tuner.denoising_loss()?;
    let output = tuner.write_output(&root, &args.out)?;
    eprintln!(
        "denoising loss {loss_before:.5} -> {loss_after:.5} ({:+.1}%), {:.2} s a step; wrote {}{}",
        100.0 * (loss_after / loss_before - 1.0),
        seconds / steps_run as f64,
        output.display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; {} files skipped", skipped.len())
        }
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "loss_before": loss_before,
                "loss_after": loss_after,
                "steps": args.steps,
                "seconds_per_step": seconds / steps_run as f64,
                "images": tuner.examples(),
                "trainable_parameters": tuner.trainable_parameters(),
                "mode": if lora { "lora" } else { "full" },
                "skipped": skipped.iter().map(|s| serde_json::json!({
                    "file": s.path.display().to_string(),
                    "reason": s.reason,
                })).collect::<Vec<_>>(),
                "output": output.display().to_string(),
            })
        );
    }
    Ok(())
}
