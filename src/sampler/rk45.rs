//! Adaptive Dormand-Prince RK5(4) on the probability-flow ODE (Song et al. 2021, section 4.3,
//! which integrates it with scipy's RK45): the ODE dx/dsigma = (x - D(x; sigma)) / sigma is
//! integrated in s = ln sigma from sigma_max down to sigma_min, then x is denoised once.

use super::euler::{denoise, SigmaGrid};
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::NoiseSchedule;
use crate::ops::ode::{dormand_prince, Tolerance};
use candle_core::{Result, Tensor};
use std::cell::Cell;

pub struct Rk45 {
    pub schedule: NoiseSchedule,
    pub sigma_max: f64,
    pub sigma_min: f64,
    pub rtol: f64,
    pub atol: f64,
    /// Upper bound on model evaluations, so that a stiff case ends with an error, not a hang.
    pub max_evaluations: usize,
    evaluations: Cell<usize>,
}

impl Rk45 {
    pub fn new(grid: &SigmaGrid, schedule: NoiseSchedule, rtol: f64, atol: f64) -> Self {
        let sigma_max = grid.sigmas[0];
        let sigma_min = grid
            .sigmas
            .iter()
            .cloned()
            .filter(|s| *s > 0.0)
            .fold(f64::INFINITY, f64::min);
        Self {
            schedule,
            sigma_max,
            sigma_min,
            rtol,
            atol,
            max_evaluations: 100_000,
            evaluations: Cell::new(0),
        }
    }

    /// dx/ds = sigma dx/dsigma = x - D(x; sigma) at s = ln sigma.
    fn slope(&self, model: &mut dyn Denoiser, x: &Tensor, s: f64) -> Result<Tensor> {
        let n = self.evaluations.get() + 1;
        if n > self.max_evaluations {
            candle_core::bail!(
                "rk45 used {} model evaluations without reaching sigma_min; loosen --rtol/--atol",
                self.max_evaluations
            )
        }
        self.evaluations.set(n);
        let sigma = s.exp();
        let x0 = denoise(model, x, sigma, self.schedule.timestep_for_sigma(sigma))?;
        x - x0
    }
}

impl Sampler for Rk45 {
    fn name(&self) -> &'static str {
        super::SamplerKind::Rk45.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigma_max
    }

    fn timesteps(&self) -> Vec<f64> {
        vec![
            self.schedule.timestep_for_sigma(self.sigma_max),
            self.schedule.timestep_for_sigma(self.sigma_min),
        ]
    }

    fn last_evaluations(&self) -> Option<usize> {
        Some(self.evaluations.get())
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        x: Tensor,
        _noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        self.evaluations.set(0);
        let mut slope = |x: &Tensor, s: f64| self.slope(model, x, s);
        let mut on_step = |index: usize, s: f64, x: &Tensor| {
            callback(&StepEvent {
                index,
                total: index + 1,
                t: self.schedule.timestep_for_sigma(s.exp()),
                sample: x,
                pred_original: None,
            })
        };
        let tolerance = Tolerance {
            rtol: self.rtol,
            atol: self.atol,
        };
        let x = dormand_prince(
            &mut slope,
            x,
            (self.sigma_max.ln(), self.sigma_min.ln()),
            tolerance,
            &mut on_step,
        )?;
        // Final denoising step from sigma_min (the reference implementation's `denoise=True`).
        let n = self.evaluations.get();
        self.evaluations.set(n + 1);
        denoise(
            model,
            &x,
            self.sigma_min,
            self.schedule.timestep_for_sigma(self.sigma_min),
        )
    }
}
