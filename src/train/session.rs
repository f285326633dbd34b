//! One training session, whatever is trained: a fresh start or `--resume`, the loop with its
//! progress bar, the loss CSV and curve, checkpoints every N steps, at the end, on Ctrl-C and at
//! the time limit, and samples every N steps. A trainer plugs in through [`Trainer`]: its data,
//! its loss and what it saves.

use super::plot::{loss_curve_png, read_losses, trim_csv};
use crate::error::{file_error, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The training checkpoint's file name inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The loss log's file name inside the output folder.
pub const LOSS_CSV: &str = "loss.csv";

/// What differs between trainers, as the session sees it.
pub trait Trainer {
    /// Completed optimiser steps.
    fn step(&self) -> usize;
    /// The CSV columns [`Trainer::train_step`] returns, the loss first.
    fn columns(&self) -> &'static [&'static str];
    /// One optimiser step; the values of [`Trainer::columns`].
    fn train_step(&mut self) -> Result<Vec<f64>>;
    /// Writes the checkpoint `out_dir/checkpoint.safetensors` and whatever the run derives from
    /// it (weights, a pipeline folder).
    fn save(&mut self, out_dir: &Path) -> Result<()>;
    /// Draws sample or validation images into `out_dir` after step `step`.
    fn sample(&mut self, _out_dir: &Path, _step: usize) -> Result<()> {
        Ok(())
    }
}

/// How a session runs: every trainer reads the same settings.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub out_dir: PathBuf,
    /// The total, counting steps taken before a resume.
    pub total_steps: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// 0: no samples.
    pub sample_every: usize,
    pub time_limit: Option<Duration>,
    pub resume: bool,
}

/// What a session did.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    /// The step the run ended at.
    pub step: usize,
    pub steps_run: usize,
    pub seconds: f64,
    /// The mean loss over the last logged window.
    pub final_loss: Option<f64>,
}

impl SessionSummary {
    pub fn steps_per_second(&self) -> f64 {
        self.steps_run as f64 / self.seconds.max(1e-9)
    }
}

/// `--time-limit` minutes as a duration, refusing zero, negative and non-finite values.
pub fn time_limit(minutes: Option<f64>) -> Result<Option<Duration>> {
    match minutes {
        Some(m) if !(m > 0.0 && m.is_finite()) => Err(Error::bad_value(
            "--time-limit",
            m,
            "a positive number of minutes",
        )),
        Some(m) => Ok(Some(Duration::from_secs_f64(m * 60.0))),
        None => Ok(None),
    }
}

/// Checks the output folder before any work: a fresh start refuses to overwrite a checkpoint, a
/// resume needs one. Returns the checkpoint's path; the folder is created when training starts.
pub fn check_out_dir(out_dir: &Path, resume: bool) -> Result<PathBuf> {
    let checkpoint = out_dir.join(CHECKPOINT_FILE);
    if !resume && checkpoint.exists() {
        return Err(file_error(
            &checkpoint,
            "already exists: pass --resume to continue it, or choose another --out-dir \
             (nothing was overwritten)",
        ));
    }
    if resume && !checkpoint.exists() {
        return Err(file_error(
            &checkpoint,
            "does not exist, so there is nothing to --resume",
        ));
    }
    Ok(checkpoint)
}

fn format_value(value: f64) -> String {
    if value != 0.0 && value.abs() < 1e-3 {
        format!("{value:.3e}")
    } else {
        format!("{value:.6}")
    }
}

/// The loss curve beside the CSV is a convenience: a drawing failure is reported, never fatal.
fn draw_curve(csv: &Path, out_dir: &Path, bar: &ProgressBar) {
    if let Err(e) = loss_curve_png(&read_losses(csv), &out_dir.join("loss.png")) {
        bar.suspend(|| eprintln!("warning: the loss curve was not drawn: {e}"));
    }
}

/// Trains until `settings.total_steps`, the time limit or Ctrl-C (which saves and returns an
/// error saying how to resume).
pub fn run_session(
    trainer: &mut dyn Trainer,
    settings: &SessionSettings,
) -> Result<SessionSummary> {
    let out_dir = &settings.out_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| file_error(out_dir, e.to_string()))?;
    let csv_path = out_dir.join(LOSS_CSV);
    if settings.resume {
        trim_csv(&csv_path, trainer.step())?;
    } else {
        let header = format!("step,{},seconds\n", trainer.columns().join(","));
        std::fs::write(&csv_path, header).map_err(|e| file_error(&csv_path, e.to_string()))?;
    }
    let mut csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .map_err(|e| file_error(&csv_path, e.to_string()))?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in one process (tests train twice): the first
        // stays in charge, which is fine since it only sets a flag.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let total = settings.total_steps;
    let bar = ProgressBar::new(total as u64).with_position(trainer.step().min(total) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} loss {msg} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let first_step = trainer.step();
    let mut window: Vec<Vec<f64>> = Vec::new();
    let mut final_loss = None;
    let io = |e: std::io::Error| file_error(&csv_path, e.to_string());
    while trainer.step() < total {
        if interrupted.load(Ordering::SeqCst) {
            bar.suspend(|| eprintln!("interrupted: saving step {}", trainer.step()));
            trainer.save(out_dir)?;
            draw_curve(&csv_path, out_dir, &bar);
            bar.abandon();
            return Err(Error::Msg(format!(
                "interrupted at step {}; the checkpoint is saved, continue with --resume",
                trainer.step()
            )));
        }
        window.push(trainer.train_step()?);
        let step = trainer.step();
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
            )
            .map_err(io)?;
            csv.flush().map_err(io)?;
            bar.set_message(format!("{:.4}", means[0]));
            final_loss = Some(means[0]);
            window.clear();
        }
        if step.is_multiple_of(settings.checkpoint_every.max(1)) || last_step {
            trainer.save(out_dir)?;
            draw_curve(&csv_path, out_dir, &bar);
        }
        if settings.sample_every > 0 && (step.is_multiple_of(settings.sample_every) || last_step) {
            bar.suspend(|| trainer.sample(out_dir, step))?;
        }
        bar.set_position(step as u64);
        if out_of_time {
            bar.suspend(|| eprintln!("time limit reached at step {step}; saved"));
            break;
        }
    }
    bar.finish();
    Ok(SessionSummary {
        step: trainer.step(),
        steps_run: trainer.step() - first_step,
        seconds: start.elapsed().as_secs_f64(),
        final_loss,
    })
}
