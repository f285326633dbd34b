//! Predictor-corrector sampling of score SDEs (Song et al. 2021, section 4.2 and Algorithm 1),
//! which also gives plain reverse-SDE sampling (no corrector) and annealed Langevin dynamics
//! (no predictor; Song & Ermon 2019, Algorithm 1).

use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::linspace;
use crate::diffusion::sde::Sde;
use crate::ops::tensor::{lincomb, mean_row_norm};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predictor {
    None,
    /// Euler-Maruyama on the reverse SDE (eq. 6) with dt = -1/N.
    EulerMaruyama,
    /// The reverse of the SDE's own discretisation (eq. 46/47; Algorithms 2 and 3).
    ReverseDiffusion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrector {
    None,
    /// Langevin MCMC with step size set by the signal-to-noise ratio r (Algorithms 4 and 5).
    Langevin,
    /// Annealed Langevin dynamics with step 2 alpha (r sigma_t)^2 (NCSN).
    AnnealedLangevin,
}

pub struct PredictorCorrector<S: Sde> {
    pub sde: S,
    pub steps: usize,
    pub predictor: Predictor,
    pub corrector: Corrector,
    /// Signal-to-noise ratio r of the corrector.
    pub snr: f64,
    /// Corrector iterations per step (M in Algorithm 1).
    pub corrector_steps: usize,
    pub name: &'static str,
}

impl<S: Sde> PredictorCorrector<S> {
    /// The grid t_i = linspace(1, eps, N) of the reference implementation.
    fn grid(&self) -> Vec<f64> {
        linspace(1.0, self.sde.sampling_eps(), self.steps)
    }

    fn score(&self, model: &mut dyn Denoiser, x: &Tensor, t: f64) -> Result<Tensor> {
        let output = model.predict(x, self.sde.model_time(t))?;
        self.sde.score(model.prediction_type(), &output, x, t)
    }

    /// One corrector iteration; returns (x, mean of x before the noise).
    fn correct(
        &self,
        model: &mut dyn Denoiser,
        x: &Tensor,
        t: f64,
        t_next: f64,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let grad = self.score(model, x, t)?;
        let z = noise.randn_like(x)?;
        let alpha = self.sde.langevin_alpha(t, t_next);
        let step = match self.corrector {
            Corrector::Langevin => {
                let ratio = self.snr * mean_row_norm(&z)? / mean_row_norm(&grad)?;
                2.0 * alpha * ratio * ratio
            }
            Corrector::AnnealedLangevin => {
                let (_, std) = self.sde.marginal(t);
                2.0 * alpha * (self.snr * std).powi(2)
            }
            Corrector::None => return Ok(x.clone()),
        };
        lincomb(&[(1.0, x), (step, &grad), ((2.0 * step).sqrt(), &z)])
    }

    /// One predictor step from t; returns (x, mean).
    fn predict(
        &self,
        model: &mut dyn Denoiser,
        x: &Tensor,
        index: usize,
        t: f64,
        t_next: f64,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        let grad = self.score(model, x, t)?;
        let (mean, diffusion) = match self.predictor {
            Predictor::EulerMaruyama => {
                let dt = -1.0 / self.steps as f64;
                let (f, g) = self.sde.drift_diffusion(t);
                // x + [f x - g^2 score] dt
                let mean = lincomb(&[(1.0 + f * dt, x), (-g * g * dt, &grad)])?;
                (mean, g * (-dt).sqrt())
            }
            Predictor::ReverseDiffusion => {
                let d = self.sde.discretise(t, t_next, index, self.steps);
                let g2 = d.diffusion * d.diffusion;
                let mean = lincomb(&[(1.0 - d.drift_coeff, x), (g2, &grad)])?;
                (mean, d.diffusion)
            }
            Predictor::None => return Ok((x.clone(), x.clone())),
        };
        let z = noise.randn_like(x)?;
        let next = lincomb(&[(1.0, &mean), (diffusion, &z)])?;
        Ok((next, mean))
    }
}

impl<S: Sde> Sampler for PredictorCorrector<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sde.prior_std()
    }

    fn timesteps(&self) -> Vec<f64> {
        self.grid()
            .into_iter()
            .map(|t| self.sde.model_time(t))
            .collect()
    }

    /// Returns the last step's mean (the reference implementation's final denoising).
    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        let grid = self.grid();
        let mut mean = x.clone();
        for (i, &t) in grid.iter().enumerate() {
            let t_next = grid.get(i + 1).copied().unwrap_or(0.0);
            if self.corrector != Corrector::None {
                for _ in 0..self.corrector_steps {
                    x = self.correct(model, &x, t, t_next, noise)?;
                }
                mean = x.clone();
            }
            if self.predictor != Predictor::None {
                (x, mean) = self.predict(model, &x, i, t, t_next, noise)?;
            }
            callback(&StepEvent {
                index: i,
                total: grid.len(),
                t: self.sde.model_time(t),
                sample: &x,
                pred_original: None,
            })?;
        }
        Ok(mean)
    }
}
