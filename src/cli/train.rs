//! `diffuse train --config configs/ddpm-mnist.toml`: pixel-space DDPM training with progress,
//! a loss CSV and curve, sample grids, atomic checkpoints, Ctrl-C saving and `--resume`.

use crate::data::idx::{LabelledImages, Split};
use crate::pipeline::pixel::grid;
use crate::sampler::{SamplerKind, SamplerOptions};
use crate::train::config::TrainConfig;
use crate::train::pixel::{PixelTrainer, StepStats};
use crate::train::plot::{loss_curve_png, read_losses, trim_csv};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The TOML training config (configs/ddpm-mnist.toml, configs/ddpm-fashion.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides data.path: the folder with the IDX files.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Overrides train.out_dir.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Overrides train.steps (the total, counting steps already taken when resuming).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from OUT_DIR/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many minutes of training (saving as at the last step), whatever
    /// train.steps says; `--resume` goes on from there.
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// File names inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const WEIGHTS_FILE: &str = "model.safetensors";
const LOSS_CSV: &str = "loss.csv";
const CSV_HEADER: &str = "step,loss,mse,vb_bits,grad_norm,learning_rate,seconds";

fn save_all(trainer: &PixelTrainer, out_dir: &Path) -> anyhow::Result<()> {
    trainer.save(&out_dir.join(CHECKPOINT_FILE))?;
    trainer.save_weights(&out_dir.join(WEIGHTS_FILE), candle_core::DType::F32)?;
    Ok(())
}

/// 64 samples from the averaged weights (DDIM, 50 steps, fixed seed), labelled 0, 1, 2, ...
/// for class-conditional models, as one grid.
fn sample_grid(trainer: &PixelTrainer, path: &Path) -> anyhow::Result<()> {
    let model = trainer.ema_model()?;
    let n = 64;
    let labels: Option<Vec<u32>> = model
        .num_classes()
        .map(|k| (0..n).map(|i| (i % k) as u32).collect());
    let images = model.sample(
        SamplerKind::Ddim,
        &SamplerOptions::default(),
        50,
        n,
        labels.as_deref(),
        0,
        &mut |_, _| {},
    )?;
    let cols = model.num_classes().unwrap_or(8);
    crate::image_io::save_png(&grid(&images, cols)?, path, None)?;
    Ok(())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = TrainConfig::from_file(&args.config)?;
    if let Some(data) = args.data {
        config.data.path = data;
    }
    if let Some(dir) = args.out_dir {
        config.train.out_dir = dir;
    }
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps > 0, "--steps = 0 is not allowed; expected at least 1");
        config.train.steps = steps;
    }
    let time_limit = match args.time_limit {
        Some(minutes) if !(minutes > 0.0 && minutes.is_finite()) => {
            anyhow::bail!(
                "--time-limit = {minutes} is not allowed; expected a positive number of minutes"
            )
        }
        Some(minutes) => Some(std::time::Duration::from_secs_f64(minutes * 60.0)),
        None => None,
    };
    config.validate()?;
    let out_dir = config.train.out_dir.clone();
    let checkpoint = out_dir.join(CHECKPOINT_FILE);
    if !args.resume && checkpoint.exists() {
        anyhow::bail!(
            "{} already exists: pass --resume to continue it, or choose another --out-dir (nothing was overwritten)",
            checkpoint.display()
        );
    }
    // Data first: a bad file stops the run before any work.
    let data = LabelledImages::load(&config.data.path, Split::Train)?;
    anyhow::ensure!(
        data.height == config.model.image_size && data.width == config.model.image_size,
        "{}: images are {}x{}, but model.image_size = {}",
        config.data.path.display(),
        data.height,
        data.width,
        config.model.image_size
    );
    if let Some(k) = config.model.num_classes {
        if let Some(bad) = data.labels.iter().find(|l| **l as usize >= k) {
            anyhow::bail!(
                "{}: label {bad} is outside model.num_classes = {k}",
                config.data.path.display()
            );
        }
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let device = super::parse_device(&args.device)?;
    let mut trainer = if args.resume {
        let trainer = PixelTrainer::resume(config.clone(), &checkpoint, &device)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), trainer.step);
        trainer
    } else {
        PixelTrainer::new(config.clone(), &device)?
    };
    let csv_path = out_dir.join(LOSS_CSV);
    if args.resume {
        trim_csv(&csv_path, trainer.step)?;
    } else {
        std::fs::write(&csv_path, format!("{CSV_HEADER}\n"))
            .with_context(|| format!("writing {}", csv_path.display()))?;
    }
    std::fs::write(out_dir.join("config.toml"), config.to_toml())?;
    let mut csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("opening {}", csv_path.display()))?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in one process (tests call run twice): the
        // first stays in charge, which is fine since it only sets a flag.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let total = config.train.steps;
    eprintln!(
        "training {} parameters on {} images ({}x{}), {} steps of batch {}",
        trainer.parameter_count(),
        data.len(),
        data.height,
        data.width,
        total,
        config.train.batch_size
    );
    let bar = ProgressBar::new(total as u64).with_position(trainer.step as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} loss {msg} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let first_step = trainer.step;
    let mut window: Vec<StepStats> = Vec::new();
    let mut last = None;
    while trainer.step < total {
        if interrupted.load(Ordering::SeqCst) {
            bar.suspend(|| eprintln!("interrupted: saving step {}", trainer.step));
            save_all(&trainer, &out_dir)?;
            bar.abandon();
            anyhow::bail!(
                "interrupted at step {}; the checkpoint is saved, continue with --resume",
                trainer.step
            );
        }
        let stats = trainer.train_step(&data)?;
        last = Some(stats);
        window.push(stats);
        let step = trainer.step;
        let out_of_time = time_limit.is_some_and(|limit| start.elapsed() >= limit);
        let last_step = step == total || out_of_time;
        if step % config.train.log_every == 0 || last_step {
            let mean =
                |f: fn(&StepStats) -> f64| window.iter().map(f).sum::<f64>() / window.len() as f64;
            writeln!(
                csv,
                "{step},{:.6},{:.6},{:.6},{:.4},{:.3e},{:.1}",
                mean(|s| s.loss),
                mean(|s| s.mse),
                mean(|s| s.vb_bits),
                mean(|s| s.grad_norm),
                stats.learning_rate,
                start.elapsed().as_secs_f64()
            )?;
            csv.flush()?;
            bar.set_message(format!("{:.4}", mean(|s| s.loss)));
            window.clear();
        }
        if step % config.train.checkpoint_every == 0 || last_step {
            save_all(&trainer, &out_dir)?;
            // The curve is a convenience beside the CSV: a drawing failure must not stop training.
            if let Err(e) = loss_curve_png(&read_losses(&csv_path), &out_dir.join("loss.png")) {
                bar.suspend(|| eprintln!("warning: {e}"));
            }
        }
        if config.train.sample_every > 0 && (step % config.train.sample_every == 0 || last_step) {
            bar.suspend(|| -> anyhow::Result<()> {
                sample_grid(&trainer, &out_dir.join(format!("samples-{step:07}.png")))
            })?;
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
    eprintln!(
        "{} steps in {seconds:.1} s ({:.2} steps/s); weights: {}",
        steps_run,
        steps_run as f64 / seconds.max(1e-9),
        out_dir.join(WEIGHTS_FILE).display()
    );
    if args.json {
        let summary = serde_json::json!({
            "steps": trainer.step,
            "steps_run": steps_run,
            "seconds": seconds,
            "steps_per_second": steps_run as f64 / seconds.max(1e-9),
            "final_loss": last.map(|s| s.loss),
            "parameters": trainer.parameter_count(),
            "checkpoint": out_dir.join(CHECKPOINT_FILE),
            "weights": out_dir.join(WEIGHTS_FILE),
        });
        println!("{summary}");
    }
    Ok(())
}
