//! The `[diffusion]` section of a training config: the forward process (betas, T), what the
//! network predicts, the reverse process's variance and the training loss.

use super::schedule::{BetaSchedule, PredictionType};
use super::variance::Variance;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// DDPM's linear betas.
    Linear,
    /// Linear in sqrt(beta) (LDM, Stable Diffusion).
    ScaledLinear,
    /// Nichol & Dhariwal 2021, eq. 17.
    Cosine,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// L_simple, DDPM eq. 14.
    Simple,
    /// L_simple + lambda L_vlb with the mean's gradient stopped in L_vlb (Nichol & Dhariwal eq. 16).
    Hybrid,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    #[serde(default = "linear")]
    pub schedule: ScheduleKind,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "train_timesteps_default")]
    pub num_train_timesteps: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub variance: Variance,
    #[serde(default = "simple")]
    pub loss: Loss,
    /// lambda of the hybrid loss.
    #[serde(default = "vlb_weight")]
    pub vlb_weight: f64,
}

impl Default for DiffusionConfig {
    /// DDPM's process: T = 1000, linear betas from 1e-4 to 0.02, epsilon prediction, the
    /// posterior variance, L_simple.
    fn default() -> Self {
        Self {
            schedule: ScheduleKind::Linear,
            beta_start: beta_start(),
            beta_end: beta_end(),
            num_train_timesteps: train_timesteps_default(),
            prediction_type: PredictionType::Epsilon,
            variance: Variance::FixedSmall,
            loss: Loss::Simple,
            vlb_weight: vlb_weight(),
        }
    }
}

impl DiffusionConfig {
    pub fn beta_schedule(&self) -> BetaSchedule {
        let (beta_start, beta_end) = (self.beta_start, self.beta_end);
        match self.schedule {
            ScheduleKind::Linear => BetaSchedule::Linear {
                beta_start,
                beta_end,
            },
            ScheduleKind::ScaledLinear => BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            },
            ScheduleKind::Cosine => BetaSchedule::SquaredCosCapV2,
        }
    }

    /// The schedule's name in diffusers' scheduler configs.
    pub fn beta_schedule_name(&self) -> &'static str {
        match self.schedule {
            ScheduleKind::Linear => "linear",
            ScheduleKind::ScaledLinear => "scaled_linear",
            ScheduleKind::Cosine => "squaredcos_cap_v2",
        }
    }
}

fn linear() -> ScheduleKind {
    ScheduleKind::Linear
}
fn beta_start() -> f64 {
    1e-4
}
fn beta_end() -> f64 {
    0.02
}
fn simple() -> Loss {
    Loss::Simple
}
fn vlb_weight() -> f64 {
    0.001
}
/// DDPM's T = 1000.
fn train_timesteps_default() -> usize {
    1000
}
