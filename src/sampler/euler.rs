//! The sigma-parameterised samplers' shared grid, Euler's method on the probability-flow ODE
//! (Karras et al. 2022, Algorithm 1 with no churn) and Euler ancestral sampling.
//!
//! These samplers work on x_sigma = x_0 + sigma eps (the VE form of a VP model: x_sigma =
//! x_t / sqrt(alpha_bar_t), sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)). The network still
//! sees its VP input x_t = x_sigma / sqrt(sigma^2 + 1) and its training timestep.

use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::{
    karras_sigmas, linspace, prediction, spaced_timesteps, NoiseSchedule, TimestepSpacing,
};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

/// Noise levels and the model time labels at which a sigma-based sampler evaluates.
#[derive(Debug, Clone)]
pub struct SigmaGrid {
    /// One time label per step (fractional where sigmas were respaced).
    pub timesteps: Vec<f64>,
    /// sigma at each step, plus the final sigma (0) after the last.
    pub sigmas: Vec<f64>,
    /// Standard deviation of x_T in the VE form.
    pub init_noise_sigma: f64,
}

/// The sigma range a Karras schedule spans. diffusers' Euler-family schedulers respace between
/// the sigmas of the spaced timesteps; its multistep solvers (DPM-Solver, UniPC) between the
/// smallest and largest sigma of training, whatever the spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KarrasRange {
    Timesteps,
    Training,
}

impl SigmaGrid {
    /// diffusers' Euler/Heun/LMS `set_timesteps`: evenly spaced timesteps (fractional for
    /// `linspace`), sigma interpolated in t, optionally respaced as Karras et al. 2022 eq. 5.
    pub fn discrete(
        schedule: &NoiseSchedule,
        spacing: TimestepSpacing,
        steps: usize,
        steps_offset: usize,
        karras: bool,
    ) -> Self {
        let n_train = schedule.num_train_timesteps();
        let timesteps = match spacing {
            TimestepSpacing::Linspace => linspace(0.0, (n_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            other => spaced_timesteps(other, n_train, steps, steps_offset),
        };
        let karras = karras.then_some(KarrasRange::Timesteps);
        let mut grid = Self::from_timesteps(schedule, timesteps, karras, false);
        let max_sigma = grid.sigmas.iter().cloned().fold(0.0, f64::max);
        grid.init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        grid
    }

    /// Sigmas at the given timesteps; with `karras`, respaced (Karras et al. 2022, eq. 5)
    /// between the end points the [`KarrasRange`] names and the timesteps recomputed from them
    /// (rounded when `round_karras_timesteps`).
    pub fn from_timesteps(
        schedule: &NoiseSchedule,
        timesteps: Vec<f64>,
        karras: Option<KarrasRange>,
        round_karras_timesteps: bool,
    ) -> Self {
        let table = schedule.sigmas();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|t| crate::diffusion::schedule::interp(*t, &table))
            .collect();
        let mut timesteps = timesteps;
        if let (Some(range), true) = (karras, sigmas.len() > 1) {
            let (sigma_min, sigma_max) = match range {
                KarrasRange::Timesteps => (*sigmas.last().expect("non-empty"), sigmas[0]),
                KarrasRange::Training => (table[0], *table.last().expect("non-empty")),
            };
            sigmas = karras_sigmas(sigma_min, sigma_max, sigmas.len());
            timesteps = sigmas
                .iter()
                .map(|s| {
                    let t = schedule.timestep_for_sigma(*s);
                    if round_karras_timesteps {
                        t.round_ties_even()
                    } else {
                        t as f32 as f64
                    }
                })
                .collect();
        }
        sigmas.push(0.0);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let init_noise_sigma = sigmas[0];
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The grid without its first `n` steps (image-to-image runs start part-way).
    pub fn skip(mut self, n: usize) -> Self {
        self.timesteps.drain(..n);
        self.sigmas.drain(..n);
        self
    }

    /// x_0 + sigma_i eps: the VE-form sample at the grid's noise level `index`.
    pub fn add_noise_ve(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        lincomb(&[(1.0, x0), (self.sigma_at(index)?, noise)])
    }

    /// alpha x_0 + sigma eps at noise level `index`, for samplers that work on VP samples.
    pub fn add_noise_vp(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = vp_coefficients(self.sigma_at(index)?);
        lincomb(&[(alpha, x0), (sigma, noise)])
    }

    fn sigma_at(&self, index: usize) -> Result<f64> {
        match self.sigmas.get(index) {
            Some(sigma) => Ok(*sigma),
            None => candle_core::bail!(
                "noise level {index} asked of a grid of {} levels",
                self.sigmas.len()
            ),
        }
    }
}

/// The VP view of noise level sigma: (alpha_t, sigma_t) = (1, sigma) / sqrt(1 + sigma^2).
pub fn vp_coefficients(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Evaluates the network at x_sigma and returns its x_0 estimate D(x_sigma; sigma), the
/// denoiser of Karras et al. 2022, eq. 2.
pub fn denoise(model: &mut dyn Denoiser, x: &Tensor, sigma: f64, t: f64) -> Result<Tensor> {
    let (alpha, sigma_vp) = vp_coefficients(sigma);
    let model_input = x.affine(alpha, 0.0)?;
    let output = model.predict(&model_input, t)?;
    prediction::to_x0(
        model.prediction_type(),
        &output,
        &model_input,
        alpha,
        sigma_vp,
    )
}

/// The probability-flow ODE's slope dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022,
/// eq. 4 with s(t) = 1, sigma(t) = t).
pub fn ode_slope(x: &Tensor, x0: &Tensor, sigma: f64) -> Result<Tensor> {
    (x - x0)?.affine(1.0 / sigma, 0.0)
}

/// Euler's method on the probability-flow ODE.
pub struct Euler {
    pub grid: SigmaGrid,
}

impl Sampler for Euler {
    fn name(&self) -> &'static str {
        super::SamplerKind::Euler.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma
    }

    fn timesteps(&self) -> Vec<f64> {
        self.grid.timesteps.clone()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.grid.sigmas.clone())
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.grid.add_noise_ve(x0, noise, index)
    }

    fn applies_after_step(&self) -> bool {
        true
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        _noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        let sigmas = &self.grid.sigmas;
        for (i, &t) in self.grid.timesteps.iter().enumerate() {
            let x0 = denoise(model, &x, sigmas[i], t)?;
            let slope = ode_slope(&x, &x0, sigmas[i])?;
            x = lincomb(&[(1.0, &x), (sigmas[i + 1] - sigmas[i], &slope)])?;
            x = model.after_step(i, x)?;
            callback(&StepEvent {
                index: i,
                total: self.grid.steps(),
                t,
                sample: &x,
                pred_original: Some(&x0),
            })?;
        }
        Ok(x)
    }
}

/// Euler ancestral sampling: an Euler step down to sigma_down, then fresh noise of variance
/// sigma_up^2 (k-diffusion's `sample_euler_ancestral`; the split satisfies sigma_down^2 +
/// sigma_up^2 = sigma_next^2 and is DDPM's posterior variance in VE form).
pub struct EulerAncestral {
    pub grid: SigmaGrid,
}

/// (sigma_down, sigma_up) for a step from `sigma_from` to `sigma_to`.
pub fn ancestral_split(sigma_from: f64, sigma_to: f64) -> (f64, f64) {
    let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
        / (sigma_from * sigma_from))
        .max(0.0)
        .sqrt();
    let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
    (sigma_down, sigma_up)
}

impl Sampler for EulerAncestral {
    fn name(&self) -> &'static str {
        super::SamplerKind::EulerAncestral.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma
    }

    fn timesteps(&self) -> Vec<f64> {
        self.grid.timesteps.clone()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.grid.sigmas.clone())
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.grid.add_noise_ve(x0, noise, index)
    }

    fn applies_after_step(&self) -> bool {
        true
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        let sigmas = &self.grid.sigmas;
        for (i, &t) in self.grid.timesteps.iter().enumerate() {
            let x0 = denoise(model, &x, sigmas[i], t)?;
            let (sigma_down, sigma_up) = ancestral_split(sigmas[i], sigmas[i + 1]);
            let slope = ode_slope(&x, &x0, sigmas[i])?;
            let z = noise.randn_like(&x)?;
            x = lincomb(&[(1.0, &x), (sigma_down - sigmas[i], &slope), (sigma_up, &z)])?;
            x = model.after_step(i, x)?;
            callback(&StepEvent {
                index: i,
                total: self.grid.steps(),
                t,
                sample: &x,
                pred_original: Some(&x0),
            })?;
        }
        Ok(x)
    }
}
