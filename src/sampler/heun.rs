//! Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1,
//! no churn): an Euler predictor and a trapezoidal corrector; the step to sigma = 0 stays Euler.

use super::euler::{denoise, ode_slope, SigmaGrid};
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

pub struct Heun {
    pub grid: SigmaGrid,
}

impl Sampler for Heun {
    fn name(&self) -> &'static str {
        super::SamplerKind::Heun.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma
    }

    /// Every step but the last calls the model twice: at t_i, then at t_{i+1}.
    fn timesteps(&self) -> Vec<f64> {
        let ts = &self.grid.timesteps;
        let mut out = vec![ts[0]];
        for t in &ts[1..] {
            out.push(*t);
            out.push(*t);
        }
        out
    }

    /// Interleaved like the timesteps: sigma_0, then each later sigma twice, then 0.
    fn sigmas(&self) -> Option<Vec<f64>> {
        let s = &self.grid.sigmas;
        let mut out = vec![s[0]];
        for sigma in &s[1..s.len() - 1] {
            out.push(*sigma);
            out.push(*sigma);
        }
        out.push(0.0);
        Some(out)
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.grid.add_noise_ve(x0, noise, index)
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        _noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        let sigmas = &self.grid.sigmas;
        let ts = &self.grid.timesteps;
        let total = 2 * ts.len() - 1;
        let mut event = 0;
        for i in 0..ts.len() {
            let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
            let dt = sigma_next - sigma;
            let x0 = denoise(model, &x, sigma, ts[i])?;
            let slope = ode_slope(&x, &x0, sigma)?;
            let x_euler = lincomb(&[(1.0, &x), (dt, &slope)])?;
            callback(&StepEvent {
                index: event,
                total,
                t: ts[i],
                sample: &x_euler,
                pred_original: Some(&x0),
            })?;
            event += 1;
            if sigma_next == 0.0 {
                x = x_euler;
                continue;
            }
            let x0_next = denoise(model, &x_euler, sigma_next, ts[i + 1])?;
            let slope_next = ode_slope(&x_euler, &x0_next, sigma_next)?;
            x = lincomb(&[(1.0, &x), (0.5 * dt, &slope), (0.5 * dt, &slope_next)])?;
            callback(&StepEvent {
                index: event,
                total,
                t: ts[i + 1],
                sample: &x,
                pred_original: Some(&x0_next),
            })?;
            event += 1;
        }
        Ok(x)
    }
}
