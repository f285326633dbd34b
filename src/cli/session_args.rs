//! The flags every training command shares, meaning the same thing in each: `--device`,
//! `--out-dir`, `--steps`, `--resume`, `--time-limit`, `--json`.

use crate::train::config::OptimConfig;
use crate::train::session::{self, SessionSettings, SessionSummary};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Args)]
pub struct SessionArgs {
    /// Where to train: auto (the GPU when this binary has CUDA and the machine a GPU, else the
    /// CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The output folder (checkpoint, loss.csv, loss.png, samples, the trained model); overrides
    /// the config's.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The total optimiser steps, counting those taken before a --resume; overrides the config's.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from OUT_DIR/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many minutes of training, saving as at the last step; --resume goes on.
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// How often a session logs, checkpoints and samples.
pub struct Cadence {
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub sample_every: usize,
}

impl From<&OptimConfig> for Cadence {
    fn from(train: &OptimConfig) -> Self {
        Self {
            log_every: train.log_every,
            checkpoint_every: train.checkpoint_every,
            sample_every: train.sample_every,
        }
    }
}

impl SessionArgs {
    /// The session's settings: the flags over the config's output folder and step count.
    pub fn settings(
        &self,
        config_out_dir: PathBuf,
        config_steps: usize,
        cadence: Cadence,
    ) -> anyhow::Result<SessionSettings> {
        if let Some(0) = self.steps {
            anyhow::bail!("--steps = 0 is not allowed; expected at least 1");
        }
        Ok(SessionSettings {
            out_dir: self.out_dir.clone().unwrap_or(config_out_dir),
            total_steps: self.steps.unwrap_or(config_steps),
            log_every: cadence.log_every,
            checkpoint_every: cadence.checkpoint_every,
            sample_every: cadence.sample_every,
            time_limit: session::time_limit(self.time_limit)?,
            resume: self.resume,
        })
    }

    /// [`Self::settings`] over a config's `out_dir` and `steps`, which are then set to what the
    /// session uses, so that the config saved with the run says what ran.
    pub fn apply(
        &self,
        out_dir: &mut PathBuf,
        steps: &mut usize,
        cadence: Cadence,
    ) -> anyhow::Result<SessionSettings> {
        let settings = self.settings(out_dir.clone(), *steps, cadence)?;
        out_dir.clone_from(&settings.out_dir);
        *steps = settings.total_steps;
        Ok(settings)
    }

    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        super::parse_training_device(&self.device)
    }
}

/// The trainer continued from `checkpoint` when the session resumes (saying so), else a fresh
/// one.
pub fn start<T>(
    settings: &SessionSettings,
    checkpoint: &std::path::Path,
    resume: impl FnOnce(&std::path::Path) -> crate::Result<T>,
    fresh: impl FnOnce() -> crate::Result<T>,
    step: impl Fn(&T) -> usize,
) -> anyhow::Result<T> {
    if settings.resume {
        let trainer = resume(checkpoint)?;
        eprintln!(
            "resuming {} at step {}",
            checkpoint.display(),
            step(&trainer)
        );
        Ok(trainer)
    } else {
        Ok(fresh()?)
    }
}

/// The summary line every training command prints, and the fields its `--json` object starts
/// with.
pub fn report(summary: &SessionSummary, what: &str) -> serde_json::Map<String, serde_json::Value> {
    eprintln!(
        "{} steps in {:.1} s ({:.2} steps/s); {what}",
        summary.steps_run,
        summary.seconds,
        summary.steps_per_second(),
    );
    let mut json = serde_json::Map::new();
    json.insert("steps".into(), summary.step.into());
    json.insert("steps_run".into(), summary.steps_run.into());
    json.insert("seconds".into(), summary.seconds.into());
    json.insert("steps_per_second".into(), summary.steps_per_second().into());
    json.insert("final_loss".into(), summary.final_loss.into());
    json
}
