//! What every training config shares: the `[train]` section of the diffusion trainers, and
//! reading a config file (unknown keys are errors that name the key; relative paths are taken
//! from the file's folder).

use crate::error::{Error, Result};
use crate::train::optim::LrSchedule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub steps: usize,
    #[serde(default = "batch")]
    pub batch_size: usize,
    #[serde(default = "learning_rate")]
    pub learning_rate: f64,
    /// Linear warm-up of the learning rate over this many steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// The last this many of `steps` cool the learning rate down linearly to
    /// `final_learning_rate` (warm-up-stable-decay, `optim::LrSchedule`); 0 keeps it constant.
    /// Both may change on `--resume`: a run trained at a constant rate is cooled down by
    /// resuming it with `steps` where it should end.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decay_steps: usize,
    #[serde(default, skip_serializing_if = "is_zero_rate")]
    pub final_learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns it off.
    #[serde(default = "grad_clip_default")]
    pub grad_clip: f64,
    #[serde(default = "ema_decay")]
    pub ema_decay: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "runs_dir")]
    pub out_dir: PathBuf,
    #[serde(default = "steps_between_default")]
    pub checkpoint_every: usize,
    /// A sample grid every this many steps; 0 turns it off.
    #[serde(default = "steps_between_default")]
    pub sample_every: usize,
    #[serde(default = "log_every")]
    pub log_every: usize,
    /// Min-SNR-gamma weighting of the loss (Hang et al. 2023, `min_snr_weights`): the nearly
    /// clean timesteps, whose many small errors otherwise take most of the gradient, count at
    /// most as much as SNR = gamma; the noisy ones, where a prompt's layout and concept are
    /// decided, keep their full weight. Unset: L_simple's equal weights. May change on
    /// `--resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
}

impl OptimConfig {
    /// The learning rate of every step.
    pub fn learning_rate_schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.learning_rate,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            decay_steps: self.decay_steps,
            final_rate: self.final_learning_rate,
        }
    }

    /// A cool-down longer than the run, a final rate outside [0, learning_rate] or a min-SNR
    /// gamma that is not a positive number is an error naming the field.
    pub fn validate_schedule_and_weighting(&self) -> Result<()> {
        if self.decay_steps > self.steps {
            return Err(Error::bad_value(
                "train.decay_steps",
                self.decay_steps,
                &format!("at most train.steps ({})", self.steps),
            ));
        }
        if !(0.0..=self.learning_rate).contains(&self.final_learning_rate) {
            return Err(Error::bad_value(
                "train.final_learning_rate",
                self.final_learning_rate,
                &format!("between 0 and train.learning_rate ({})", self.learning_rate),
            ));
        }
        match self.min_snr_gamma {
            Some(gamma) if !(gamma > 0.0 && gamma.is_finite()) => Err(Error::bad_value(
                "train.min_snr_gamma",
                gamma,
                "a positive number",
            )),
            _ => Ok(()),
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
fn is_zero_rate(rate: &f64) -> bool {
    *rate == 0.0
}
fn batch() -> usize {
    64
}
fn learning_rate() -> f64 {
    2e-4
}
/// Global gradient-norm clipping at 1.
fn grad_clip_default() -> f64 {
    1.0
}
fn ema_decay() -> f64 {
    0.999
}
fn runs_dir() -> PathBuf {
    PathBuf::from("runs/ddpm")
}
fn log_every() -> usize {
    50
}
/// Steps between checkpoints and between sample grids.
fn steps_between_default() -> usize {
    1000
}

/// A TOML document as a config struct (unknown keys are errors that name the key, through each
/// struct's `deny_unknown_fields`).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| Error::Msg(e.to_string()))
}

/// Reads the config file at `path` with `parse`, naming the file in any error.
pub fn read_config<T>(path: &Path, parse: impl Fn(&str) -> Result<T>) -> Result<T> {
    let file_error = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    parse(&text).map_err(|e| file_error(e.to_string()))
}

/// A path from a config file: relative ones are taken from the file's folder `base`.
pub fn relative_to(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// The folder a config file's relative paths start from.
pub fn config_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}
