//! The loop every training command shares: progress bar, loss CSV and curve, checkpoints every
//! N steps, at the end, on Ctrl-C and at a time limit, and sample images every N steps.

use crate::train::plot::{loss_curve_png, read_losses, trim_csv};
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The flags of `diffuse train`, for every kind of training config.
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
    /// Text-to-image configs: the dtype of the pipeline folder's text encoder and U-Net
    /// (f32, f16 or bf16; the training state stays f32).
    #[arg(long, default_value = "f32")]
    pub pipeline_dtype: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// What a training command plugs into [`run_loop`].
pub trait TrainingRun {
    /// Completed optimiser steps.
    fn step(&self) -> usize;
    /// One optimiser step; the values of the CSV columns after `step` (the loss first).
    fn train_step(&mut self) -> anyhow::Result<Vec<f64>>;
    /// Writes the checkpoint (and whatever the run derives from it).
    fn save(&mut self) -> anyhow::Result<()>;
    /// Draws sample images after step `step`.
    fn sample(&mut self, _step: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

pub struct LoopSettings {
    pub out_dir: PathBuf,
    pub total_steps: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// 0: no samples.
    pub sample_every: usize,
    pub time_limit: Option<Duration>,
    /// The CSV's header: `step`, the columns of [`TrainingRun::train_step`], `seconds`.
    pub csv_header: &'static str,
    pub resume: bool,
}

pub struct LoopSummary {
    pub steps_run: usize,
    pub seconds: f64,
    /// The mean loss over the last logged window.
    pub final_loss: Option<f64>,
}

/// The command line's `--out-dir` and `--steps` over a config's `train.out_dir` and
/// `train.steps`; `--steps 0` is refused.
pub fn apply_overrides(
    out_dir: &mut PathBuf,
    steps: &mut usize,
    cli_out_dir: Option<PathBuf>,
    cli_steps: Option<usize>,
) -> anyhow::Result<()> {
    if let Some(dir) = cli_out_dir {
        *out_dir = dir;
    }
    if let Some(n) = cli_steps {
        anyhow::ensure!(n > 0, "--steps = 0 is not allowed; expected at least 1");
        *steps = n;
    }
    Ok(())
}

/// `--time-limit` minutes as a duration, refusing zero, negative and non-finite values.
pub fn time_limit(minutes: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match minutes {
        Some(m) if !(m > 0.0 && m.is_finite()) => {
            anyhow::bail!(
                "--time-limit = {m} is not allowed; expected a positive number of minutes"
            )
        }
        Some(m) => Ok(Some(Duration::from_secs_f64(m * 60.0))),
        None => Ok(None),
    }
}

/// Refuses to start over an existing checkpoint unless resuming.
pub fn check_fresh_start(checkpoint: &Path, resume: bool) -> anyhow::Result<()> {
    if !resume && checkpoint.exists() {
        anyhow::bail!(
            "{} already exists: pass --resume to continue it, or choose another --out-dir (nothing was overwritten)",
            checkpoint.display()
        );
    }
    Ok(())
}

fn format_value(value: f64) -> String {
    if value != 0.0 && value.abs() < 1e-3 {
        format!("{value:.3e}")
    } else {
        format!("{value:.6}")
    }
}

/// Trains until `settings.total_steps`, the time limit or Ctrl-C (which saves and returns an
/// error saying how to resume).
pub fn run_loop(run: &mut dyn TrainingRun, settings: &LoopSettings) -> anyhow::Result<LoopSummary> {
    let out_dir = &settings.out_dir;
    let csv_path = out_dir.join("loss.csv");
    if settings.resume {
        trim_csv(&csv_path, run.step())?;
    } else {
        std::fs::write(&csv_path, format!("{}\n", settings.csv_header))
            .with_context(|| format!("writing {}", csv_path.display()))?;
    }
    let mut csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("opening {}", csv_path.display()))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in one process (tests train twice): the first
        // stays in charge, which is fine since it only sets a flag.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let total = settings.total_steps;
    let bar = ProgressBar::new(total as u64).with_position(run.step() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} loss {msg} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let first_step = run.step();
    let mut window: Vec<Vec<f64>> = Vec::new();
    let mut final_loss = None;
    while run.step() < total {
        if interrupted.load(Ordering::SeqCst) {
            bar.suspend(|| eprintln!("interrupted: saving step {}", run.step()));
            run.save()?;
            bar.abandon();
            anyhow::bail!(
                "interrupted at step {}; the checkpoint is saved, continue with --resume",
                run.step()
            );
        }
        window.push(run.train_step()?);
        let step = run.step();
        let out_of_time = settings
            .time_limit
            .is_some_and(|limit| start.elapsed() >= limit);
        let last_step = step == total || out_of_time;
        if step.is_multiple_of(settings.log_every.max(1)) || last_step {
            let columns = window[0].len();
            let means: Vec<f64> = (0..columns)
                .map(|c| window.iter().map(|row| row[c]).sum::<f64>() / window.len() as f64)
                .collect();
            let values: Vec<String> = means.iter().map(|v| format_value(*v)).collect();
            writeln!(
                csv,
                "{step},{},{:.1}",
                values.join(","),
                start.elapsed().as_secs_f64()
            )?;
            csv.flush()?;
            bar.set_message(format!("{:.4}", means[0]));
            final_loss = Some(means[0]);
            window.clear();
        }
        if step.is_multiple_of(settings.checkpoint_every) || last_step {
            run.save()?;
            // The curve is a convenience beside the CSV: a drawing failure must not stop training.
            if let Err(e) = loss_curve_png(&read_losses(&csv_path), &out_dir.join("loss.png")) {
                bar.suspend(|| eprintln!("warning: the loss curve was not drawn: {e}"));
            }
        }
        if settings.sample_every > 0 && (step.is_multiple_of(settings.sample_every) || last_step) {
            bar.suspend(|| run.sample(step))?;
        }
        bar.set_position(step as u64);
        if out_of_time {
            bar.suspend(|| eprintln!("time limit reached at step {step}; saved"));
            break;
        }
    }
    bar.finish();
    Ok(LoopSummary {
        steps_run: run.step() - first_step,
        seconds: start.elapsed().as_secs_f64(),
        final_loss,
    })
}
