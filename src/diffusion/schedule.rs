//! Noise schedules: betas, alpha-bar, sigmas and timestep spacings.
//!
//! Tables are computed the way diffusers computes them (betas and alphas in float32, the cumulative
//! product accumulated in float64 and stored as float32) so that a sampler driven by these tables
//! lands on the same numbers as diffusers; they are kept here as `f64` for the arithmetic after.

use crate::error::{Error, Result};
use candle_core::Tensor;

/// How the training betas beta_1..beta_T are laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// DDPM (Ho et al. 2020, section 4): beta_t linear from `beta_start` to `beta_end`.
    Linear { beta_start: f64, beta_end: f64 },
    /// Stable Diffusion: sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end).
    ScaledLinear { beta_start: f64, beta_end: f64 },
    /// Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    /// s = 0.008, each beta capped at 0.999.
    SquaredCosCapV2,
    /// Explicit betas, one per training step.
    Trained(Vec<f64>),
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise epsilon (DDPM eq. 11).
    #[default]
    Epsilon,
    /// The velocity v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, section 4).
    #[serde(alias = "v")]
    VPrediction,
    /// The clean sample x_0.
    Sample,
    /// The score grad log p_t(x_t) = -eps / sigma_t (NCSN, score SDE models).
    Score,
}

impl PredictionType {
    /// The name diffusers' configs use.
    pub fn config_name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
            Self::Score => "score",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" | "v" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            "score" => Ok(Self::Score),
            other => Err(Error::BadValue {
                key: "prediction_type".into(),
                value: other.into(),
                allowed: "epsilon, v_prediction, sample, score".into(),
            }),
        }
    }
}

/// How inference timesteps are picked among the training steps (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::BadValue {
                key: "timestep_spacing".into(),
                value: other.into(),
                allowed: "linspace, leading, trailing".into(),
            }),
        }
    }
}

/// The discrete forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

fn round_f32(value: f64) -> f64 {
    value as f32 as f64
}

/// `n` evenly spaced points from `start` to `end` inclusive, as numpy's `linspace`.
pub fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        end
                    } else {
                        start + step * i as f64
                    }
                })
                .collect()
        }
    }
}

impl NoiseSchedule {
    /// Builds the schedule's `num_train_timesteps` betas; `rescale_zero_snr` applies
    /// Lin et al. 2023, Algorithm 1 (terminal alpha_bar = 0).
    pub fn new(
        beta_schedule: &BetaSchedule,
        num_train_timesteps: usize,
        rescale_zero_snr: bool,
    ) -> Result<Self> {
        if num_train_timesteps == 0 {
            return Err(Error::BadValue {
                key: "num_train_timesteps".into(),
                value: "0".into(),
                allowed: "a positive integer".into(),
            });
        }
        let n = num_train_timesteps;
        let betas: Vec<f64> = match beta_schedule {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => linspace(*beta_start, *beta_end, n),
            BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            } => linspace(beta_start.sqrt(), beta_end.sqrt(), n)
                .into_iter()
                .map(|b| round_f32(b).powi(2))
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
            BetaSchedule::Trained(betas) => {
                if betas.len() != n {
                    return Err(Error::Contradiction(format!(
                        "trained_betas has {} entries but num_train_timesteps is {n}",
                        betas.len()
                    )));
                }
                betas.clone()
            }
        };
        let mut betas: Vec<f64> = betas.into_iter().map(round_f32).collect();
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b <= 1.0))
        {
            return Err(Error::Contradiction(format!(
                "beta_{i} = {b} is outside (0, 1]: check beta_start, beta_end and trained_betas"
            )));
        }
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = cumprod_f32(&betas);
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// VE-form noise level of each training step: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    /// (Karras et al. 2022, table 1, VP row), increasing with t.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| round_f32(((1.0 - a) / a).sqrt()))
            .collect()
    }

    /// log SNR lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) (Kingma et al. 2021, eq. 3).
    pub fn log_snr(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| (a / (1.0 - a)).ln())
            .collect()
    }

    /// sigma at a fractional training timestep: linear interpolation of the sigma table, as
    /// diffusers' sigma-based schedulers do (`np.interp`).
    pub fn sigma_at(&self, timestep: f64) -> f64 {
        interp(timestep, &self.sigmas())
    }

    /// The fractional timestep whose sigma is `sigma`, by interpolating log sigma between the two
    /// neighbouring training steps (the inverse used for Karras spacing).
    pub fn timestep_for_sigma(&self, sigma: f64) -> f64 {
        let log_sigmas: Vec<f64> = self.sigmas().iter().map(|s| s.ln()).collect();
        timestep_for_log_sigma(sigma, &log_sigmas)
    }
}

/// Piecewise-linear interpolation of `table` (indexed 0..len) at `x`, clamped at the ends.
pub fn interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let low = x.floor() as usize;
    let frac = x - low as f64;
    table[low] + frac * (table[low + 1] - table[low])
}

pub(crate) fn timestep_for_log_sigma(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count_below = log_sigmas.iter().filter(|ls| log_sigma >= **ls).count();
    let low = count_below.saturating_sub(1).min(log_sigmas.len() - 2);
    let high = low + 1;
    let w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// alpha_t = 1 - beta_t in float32, their running product in float64, stored as float32.
fn cumprod_f32(betas: &[f64]) -> Vec<f64> {
    let mut product = 1.0f64;
    betas
        .iter()
        .map(|b| {
            product *= (1.0f32 - *b as f32) as f64;
            round_f32(product)
        })
        .collect()
}

/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
/// shift and scale sqrt(alpha_bar) so the last step has zero SNR while the first keeps its value.
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let sqrt_alpha_bar: Vec<f64> = cumprod_f32(betas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_alpha_bar[0];
    let last = *sqrt_alpha_bar.last().expect("non-empty betas");
    let scale = first / (first - last);
    let alpha_bar: Vec<f64> = sqrt_alpha_bar
        .iter()
        .map(|s| ((s - last) * scale).powi(2))
        .collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(round_f32(1.0 - alpha_bar[0]));
    for pair in alpha_bar.windows(2) {
        rescaled.push(round_f32(1.0 - pair[1] / pair[0]));
    }
    rescaled
}

/// Discrete inference timesteps, largest first (diffusers' `set_timesteps` for DDPM, DDIM, PNDM and
/// the sigma-based schedulers).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n_train = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            let mut out = Vec::new();
            let mut t = n_train as f64;
            while t > 0.0 && out.len() < steps {
                out.push(t.round_ties_even() - 1.0);
                t -= ratio;
            }
            out
        }
    }
}

/// Timesteps of the multistep solvers (DPM-Solver, UniPC): `steps + 1` points with the last dropped.
pub fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n_train = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = linspace(0.0, (n_train - 1) as f64, steps + 1)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => spaced_timesteps(spacing, n_train, steps, 0),
    }
}

/// Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
/// sigma_max^(1/rho)))^rho with rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Converts a network output to x_0 and epsilon given x_t = alpha_t x_0 + sigma_t eps (for a VP
/// process alpha_t^2 + sigma_t^2 = 1; for VE alpha_t = 1) (DDPM eq. 4 rewritten; v as in Salimans & Ho 2022, eq. 10).
pub mod prediction {
    use super::PredictionType;
    use crate::ops::tensor::lincomb;
    use candle_core::{Result, Tensor};

    /// x_0 from the model output at (alpha_t, sigma_t).
    pub fn to_x0(
        kind: PredictionType,
        model_output: &Tensor,
        x_t: &Tensor,
        alpha_t: f64,
        sigma_t: f64,
    ) -> Result<Tensor> {
        match kind {
            PredictionType::Epsilon => {
                lincomb(&[(1.0 / alpha_t, x_t), (-sigma_t / alpha_t, model_output)])
            }
            PredictionType::VPrediction => lincomb(&[(alpha_t, x_t), (-sigma_t, model_output)]),
            PredictionType::Sample => Ok(model_output.clone()),
            // Tweedie: E[x_0 | x_t] = (x_t + sigma_t^2 score) / alpha_t.
            PredictionType::Score => lincomb(&[
                (1.0 / alpha_t, x_t),
                (sigma_t * sigma_t / alpha_t, model_output),
            ]),
        }
    }

    /// epsilon from the model output at (alpha_t, sigma_t).
    pub fn to_eps(
        kind: PredictionType,
        model_output: &Tensor,
        x_t: &Tensor,
        alpha_t: f64,
        sigma_t: f64,
    ) -> Result<Tensor> {
        match kind {
            PredictionType::Epsilon => Ok(model_output.clone()),
            PredictionType::VPrediction => lincomb(&[(sigma_t, x_t), (alpha_t, model_output)]),
            PredictionType::Sample => {
                lincomb(&[(1.0 / sigma_t, x_t), (-alpha_t / sigma_t, model_output)])
            }
            PredictionType::Score => model_output.affine(-sigma_t, 0.0),
        }
    }

    /// Both at once.
    pub fn to_x0_eps(
        kind: PredictionType,
        model_output: &Tensor,
        x_t: &Tensor,
        alpha_t: f64,
        sigma_t: f64,
    ) -> Result<(Tensor, Tensor)> {
        Ok((
            to_x0(kind, model_output, x_t, alpha_t, sigma_t)?,
            to_eps(kind, model_output, x_t, alpha_t, sigma_t)?,
        ))
    }
}

/// One value per batch row as a (B, 1, ..., 1) tensor that broadcasts against `like`.
pub fn per_row(values: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = values.len();
    Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
}

/// x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4), one timestep per row.
pub fn q_sample(
    schedule: &NoiseSchedule,
    x0: &Tensor,
    timesteps: &[usize],
    eps: &Tensor,
) -> candle_core::Result<Tensor> {
    let coeff = |f: &dyn Fn(f64) -> f64| {
        let values = timesteps
            .iter()
            .map(|t| f(schedule.alphas_cumprod[*t]) as f32)
            .collect();
        per_row(values, x0)
    };
    let signal = coeff(&|ab| ab.sqrt())?;
    let noise = coeff(&|ab| (1.0 - ab).sqrt())?;
    x0.broadcast_mul(&signal)? + eps.broadcast_mul(&noise)?
}

/// Min-SNR-gamma loss weights (Hang et al. 2023): each timestep's loss counts as if it were
/// the x_0-space loss weighted by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t),
/// which caps the weight of the nearly clean steps that otherwise dominate training. In the
/// model's own target space that is min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) /
/// (SNR + 1) for v and min(SNR, gamma) for x_0 (as diffusers' training scripts use it).
pub fn min_snr_weights(
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    gamma: f64,
    timesteps: &[usize],
) -> Vec<f64> {
    timesteps
        .iter()
        .map(|t| {
            let alpha_bar = schedule.alphas_cumprod[*t];
            let snr = alpha_bar / (1.0 - alpha_bar);
            let capped = snr.min(gamma);
            match prediction {
                PredictionType::VPrediction => capped / (snr + 1.0),
                PredictionType::Sample => capped,
                PredictionType::Epsilon | PredictionType::Score => capped / snr,
            }
        })
        .collect()
}

/// What a model trained with `prediction` learns to output at x_t = q_sample(x_0, eps, t): eps,
/// x_0, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, section 4).
pub fn training_target(
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    x0: &Tensor,
    eps: &Tensor,
    timesteps: &[usize],
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => eps.clone(),
        PredictionType::Sample => x0.clone(),
        PredictionType::VPrediction => {
            let alphas: Vec<f64> = timesteps
                .iter()
                .map(|t| schedule.alphas_cumprod[*t])
                .collect();
            let signal = per_row(alphas.iter().map(|a| a.sqrt() as f32).collect(), x0)?;
            let noise = per_row(alphas.iter().map(|a| (1.0 - a).sqrt() as f32).collect(), x0)?;
            (eps.broadcast_mul(&signal)? - x0.broadcast_mul(&noise)?)?
        }
        PredictionType::Score => {
            return Err(Error::bad_value(
                "prediction_type",
                "score",
                "epsilon, sample or v_prediction for training",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_ddpm_endpoints() {
        let s = NoiseSchedule::new(
            &BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            1000,
            false,
        )
        .unwrap();
        assert!((s.betas[0] - 1e-4).abs() < 1e-10);
        assert!((s.betas[999] - 0.02).abs() < 1e-9);
        // DDPM section 4: alpha_bar_T is about 4e-5, so x_T is close to pure noise.
        assert!(s.alphas_cumprod[999] < 1e-4 && s.alphas_cumprod[999] > 1e-5);
    }

    #[test]
    fn cosine_betas_are_capped() {
        let s = NoiseSchedule::new(&BetaSchedule::SquaredCosCapV2, 1000, false).unwrap();
        assert!((s.betas[999] - 0.999).abs() < 1e-6);
        assert!(s.betas.iter().all(|b| *b <= 0.999 + 1e-7));
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_and_keeps_first() {
        let base = BetaSchedule::ScaledLinear {
            beta_start: 0.00085,
            beta_end: 0.012,
        };
        let plain = NoiseSchedule::new(&base, 1000, false).unwrap();
        let rescaled = NoiseSchedule::new(&base, 1000, true).unwrap();
        assert!(rescaled.alphas_cumprod[999].abs() < 1e-12);
        assert!((rescaled.alphas_cumprod[0] - plain.alphas_cumprod[0]).abs() < 1e-6);
    }

    #[test]
    fn spacings_match_diffusers_examples() {
        // Values printed by diffusers for T = 1000, 10 steps.
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Leading, 1000, 10, 1),
            vec![901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Linspace, 1000, 10, 1),
            vec![999., 888., 777., 666., 555., 444., 333., 222., 111., 0.]
        );
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 10, 1),
            vec![999., 899., 799., 699., 599., 499., 399., 299., 199., 99.]
        );
        assert_eq!(
            multistep_timesteps(TimestepSpacing::Linspace, 1000, 10, 1),
            vec![999., 899., 799., 699., 599., 500., 400., 300., 200., 100.]
        );
    }

    #[test]
    fn sigma_timestep_round_trip() {
        let s = NoiseSchedule::new(
            &BetaSchedule::ScaledLinear {
                beta_start: 0.00085,
                beta_end: 0.012,
            },
            1000,
            false,
        )
        .unwrap();
        for t in [0.0, 10.0, 500.0, 998.0, 999.0] {
            let back = s.timestep_for_sigma(s.sigma_at(t));
            assert!((back - t).abs() < 1e-3, "{t} -> {back}");
        }
    }
}
