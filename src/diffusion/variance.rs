//! The variance of the reverse process p(x_{t-1} | x_t): fixed (DDPM section 3.2) or learned
//! (Nichol & Dhariwal 2021, section 3.1).

use candle_core::{Result, Tensor};

/// The variance of p(x_{t-1} | x_t) (DDPM section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// sigma_t^2 = beta~_t, the posterior variance (DDPM eq. 7): optimal for deterministic x_0.
    #[default]
    FixedSmall,
    /// sigma_t^2 = beta_t: optimal for x_0 ~ N(0, I).
    FixedLarge,
    /// The model outputs twice the channels: the prediction, then v in [-1, 1] that sets
    /// log sigma_t^2 = (v + 1)/2 log beta_t + (1 - v)/2 log beta~_t (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

impl Variance {
    /// Whether the model's output carries the variance channels after the prediction.
    pub fn is_learned(self) -> bool {
        self == Variance::LearnedRange
    }
}

/// Splits a learned-variance model output (B, 2C, ...) into the prediction and v.
pub fn split_learned_variance(output: &Tensor) -> Result<(Tensor, Tensor)> {
    let channels = output.dim(1)? / 2;
    Ok((
        output.narrow(1, 0, channels)?,
        output.narrow(1, channels, channels)?,
    ))
}

/// log sigma_t^2 of eq. 15 for the model's v in [-1, 1], with the posterior's log variance
/// `log_posterior_variance` (log beta~_t, clipped at t = 0 as improved-diffusion does) and log beta_t.
pub fn learned_log_variance(
    v: &Tensor,
    log_posterior_variance: f64,
    log_beta: f64,
) -> Result<Tensor> {
    let frac = v.affine(0.5, 0.5)?;
    frac.affine(log_beta - log_posterior_variance, log_posterior_variance)
}
