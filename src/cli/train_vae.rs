//! `diffuse train-vae --config configs/tiny-vae.toml`: trains the latent autoencoder with a
//! progress bar, a loss CSV and curve, atomic checkpoints, Ctrl-C saving and `--resume`, and
//! writes it in the diffusers `vae/` layout with its latent scaling factor.

use crate::data::idx::Split;
use crate::pipeline::pixel::grid;
use crate::train::plot::{loss_curve_png, read_losses, trim_csv};
use crate::train::vae::{load_pooled, VaeTrainConfig, VaeTrainer};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct TrainVaeArgs {
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The TOML config (configs/tiny-vae.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides train.out_dir.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Overrides train.steps (the total, counting steps already taken when resuming).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from OUT_DIR/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many minutes of training (saved; `--resume` goes on).
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

const CSV_HEADER: &str = "step,loss,l1,kl,grad_norm,learning_rate,seconds";

pub fn run(args: TrainVaeArgs) -> anyhow::Result<()> {
    let mut config = VaeTrainConfig::from_file(&args.config)?;
    if let Some(dir) = args.out_dir {
        config.train.out_dir = dir;
    }
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps > 0, "--steps = 0 is not allowed; expected at least 1");
        config.train.steps = steps;
    }
    let time_limit = match args.time_limit {
        Some(minutes) if !(minutes > 0.0 && minutes.is_finite()) => anyhow::bail!(
            "--time-limit = {minutes} is not allowed; expected a positive number of minutes"
        ),
        Some(minutes) => Some(std::time::Duration::from_secs_f64(minutes * 60.0)),
        None => None,
    };
    let out_dir = config.train.out_dir.clone();
    let checkpoint = out_dir.join("checkpoint.safetensors");
    if !args.resume && checkpoint.exists() {
        anyhow::bail!(
            "{} already exists: pass --resume to continue it, or choose another --out-dir (nothing was overwritten)",
            checkpoint.display()
        );
    }
    // Data first: a bad file stops the run before any work.
    let train = load_pooled(&config.data.paths, Split::Train)?;
    let test = load_pooled(&config.data.paths, Split::Test)?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let device = super::parse_device(&args.device)?;
    let mut trainer = if args.resume {
        let trainer = VaeTrainer::resume(config.clone(), &checkpoint, &device)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), trainer.step);
        trainer
    } else {
        VaeTrainer::new(config.clone(), &device)?
    };
    let csv_path = out_dir.join("loss.csv");
    if args.resume {
        trim_csv(&csv_path, trainer.step)?;
    } else {
        std::fs::write(&csv_path, format!("{CSV_HEADER}\n"))
            .with_context(|| format!("writing {}", csv_path.display()))?;
    }
    let mut csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("opening {}", csv_path.display()))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in one process; the first one stays.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let total = config.train.steps;
    eprintln!(
        "training a {:.2} M-parameter VAE on {} images ({}x{} padded to {s}x{s}), {total} steps of batch {}",
        trainer.parameter_count() as f64 / 1e6,
        train.len(),
        train.height,
        train.width,
        config.train.batch_size,
        s = config.data.image_size,
    );
    let bar = ProgressBar::new(total as u64).with_position(trainer.step as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} loss {msg} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let first_step = trainer.step;
    let mut last = None;
    while trainer.step < total {
        if interrupted.load(Ordering::SeqCst) {
            trainer.save(&checkpoint)?;
            bar.abandon();
            anyhow::bail!(
                "interrupted at step {}; the checkpoint is saved, continue with --resume",
                trainer.step
            );
        }
        let stats = trainer.train_step(&train)?;
        last = Some(stats);
        let step = trainer.step;
        let out_of_time = time_limit.is_some_and(|limit| start.elapsed() >= limit);
        let last_step = step == total || out_of_time;
        if step % config.train.log_every == 0 || last_step {
            writeln!(
                csv,
                "{step},{:.6},{:.6},{:.3},{:.4},{:.3e},{:.1}",
                stats.loss,
                stats.reconstruction,
                stats.kl,
                stats.grad_norm,
                stats.learning_rate,
                start.elapsed().as_secs_f64()
            )?;
            bar.set_message(format!("{:.4}", stats.loss));
        }
        if step % config.train.checkpoint_every == 0 || last_step {
            trainer.save(&checkpoint)?;
            if let Err(e) = loss_curve_png(&read_losses(&csv_path), &out_dir.join("loss.png")) {
                bar.suspend(|| eprintln!("warning: the loss curve was not drawn: {e}"));
            }
        }
        bar.set_position(step as u64);
        if out_of_time {
            bar.suspend(|| eprintln!("time limit reached at step {step}; saved"));
            break;
        }
    }
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    let steps_run = trainer.step - first_step;
    let (l1, psnr) = trainer.evaluate(&test, 1000)?;
    let scaling_factor = trainer.scaling_factor(&train)?;
    let vae_dir = out_dir.join("vae");
    trainer.write_diffusers(&vae_dir, scaling_factor)?;
    // Eight test images over their reconstructions.
    let originals = crate::train::vae::pad_to(
        &test.batch(&(0..8).collect::<Vec<_>>(), &candle_core::Device::Cpu)?,
        config.data.image_size,
    )?
    .to_device(&device)?;
    let pairs = candle_core::Tensor::cat(
        &[
            originals.clone(),
            trainer.reconstruct(&originals)?.clamp(-1f32, 1f32)?,
        ],
        0,
    )?;
    let grid_path = out_dir.join("reconstructions.png");
    crate::image_io::save_png(&grid(&pairs, 8)?, &grid_path, None)?;
    eprintln!(
        "{steps_run} steps in {seconds:.1} s; test reconstruction L1 {l1:.4}, PSNR {psnr:.2} dB; \
         latent scaling factor {scaling_factor:.4}; wrote {}",
        vae_dir.display()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "steps": trainer.step,
                "steps_run": steps_run,
                "seconds": seconds,
                "final_loss": last.map(|s| s.loss),
                "final_kl": last.map(|s| s.kl),
                "test_l1": l1,
                "test_psnr_db": psnr,
                "scaling_factor": scaling_factor,
                "parameters": trainer.parameter_count(),
                "vae": vae_dir,
                "reconstructions": grid_path,
            })
        );
    }
    Ok(())
}
