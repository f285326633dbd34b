//! DDIM (Song, Meng & Ermon 2021, eq. 12), with eta interpolating to DDPM (eq. 16).

use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent, X0Clip};
use crate::diffusion::schedule::{prediction, NoiseSchedule};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

pub struct Ddim {
    pub schedule: NoiseSchedule,
    pub timesteps: Vec<usize>,
    /// Training steps between inference steps, T / steps (kept when an img2img run drops the
    /// first steps).
    pub stride: usize,
    /// eta = 0: deterministic DDIM; eta = 1: DDPM's posterior variance.
    pub eta: f64,
    /// alpha_bar used after the last step: 1 (`set_alpha_to_one`) or alpha_bar_0.
    pub final_alpha_cumprod: f64,
    pub clip: X0Clip,
}

impl Sampler for Ddim {
    fn name(&self) -> &'static str {
        super::SamplerKind::Ddim.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn timesteps(&self) -> Vec<f64> {
        self.timesteps.iter().map(|t| *t as f64).collect()
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        super::add_noise_at_timestep(
            &self.schedule.alphas_cumprod,
            &self.timesteps,
            x0,
            noise,
            index,
        )
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
        let kind = model.prediction_type();
        let stride = self.stride;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let model_output = model.predict(&x, t as f64)?;
            let alpha_bar_t = self.schedule.alphas_cumprod[t];
            // diffusers steps back by T / steps whatever the spacing; we follow it for parity.
            let alpha_bar_prev = match t.checked_sub(stride) {
                Some(prev) => self.schedule.alphas_cumprod[prev],
                None => self.final_alpha_cumprod,
            };
            let (alpha, sigma) = (alpha_bar_t.sqrt(), (1.0 - alpha_bar_t).sqrt());
            let (x0, eps) = prediction::to_x0_eps(kind, &model_output, &x, alpha, sigma)?;
            let x0 = self.clip.apply(x0)?;
            // sigma_t(eta) of eq. 16.
            let variance =
                (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev);
            let std_dev = self.eta * variance.sqrt();
            let direction = (1.0 - alpha_bar_prev - std_dev * std_dev).max(0.0).sqrt();
            let mut next = lincomb(&[(alpha_bar_prev.sqrt(), &x0), (direction, &eps)])?;
            if self.eta > 0.0 {
                let z = noise.randn_like(&x)?;
                next = (next + z.affine(std_dev, 0.0)?)?;
            }
            x = model.after_step(i, next)?;
            callback(&StepEvent {
                index: i,
                total: self.timesteps.len(),
                t: t as f64,
                sample: &x,
                pred_original: Some(&x0),
            })?;
        }
        Ok(x)
    }
}
