//! DDPM ancestral sampling (Ho et al. 2020, Algorithm 2).

use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent, X0Clip};
use crate::diffusion::schedule::{prediction, NoiseSchedule};
use crate::diffusion::variance::{learned_log_variance, split_learned_variance, Variance};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

pub struct Ddpm {
    pub schedule: NoiseSchedule,
    pub timesteps: Vec<usize>,
    pub variance: Variance,
    pub clip: X0Clip,
}

impl Ddpm {
    fn alpha_bar(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.schedule.alphas_cumprod[t])
    }
}

impl Sampler for Ddpm {
    fn name(&self) -> &'static str {
        super::SamplerKind::Ddpm.cli_name()
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
        for (i, &t) in self.timesteps.iter().enumerate() {
            let prev_t = self.timesteps.get(i + 1).copied();
            let model_output = model.predict(&x, t as f64)?;
            let (model_output, learned) = if self.variance.is_learned() {
                let (prediction, v) = split_learned_variance(&model_output)?;
                (prediction, Some(v))
            } else {
                (model_output, None)
            };
            let alpha_bar_t = self.alpha_bar(Some(t));
            let alpha_bar_prev = self.alpha_bar(prev_t);
            // alpha_t and beta_t of the (possibly strided) step t -> prev_t.
            let alpha_t = alpha_bar_t / alpha_bar_prev;
            let beta_t = 1.0 - alpha_t;
            let x0 = prediction::to_x0(
                kind,
                &model_output,
                &x,
                alpha_bar_t.sqrt(),
                (1.0 - alpha_bar_t).sqrt(),
            )?;
            let x0 = self.clip.apply(x0)?;
            // Posterior mean mu~_t(x_t, x_0), DDPM eq. 7.
            let x0_coeff = alpha_bar_prev.sqrt() * beta_t / (1.0 - alpha_bar_t);
            let xt_coeff = alpha_t.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t);
            let mut next = lincomb(&[(x0_coeff, &x0), (xt_coeff, &x)])?;
            if t > 0 {
                let posterior_variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t;
                let z = noise.randn_like(&x)?;
                let scaled = match (self.variance, &learned) {
                    (Variance::LearnedRange, Some(v)) => {
                        let log_variance = learned_log_variance(
                            v,
                            posterior_variance.max(1e-20).ln(),
                            beta_t.ln(),
                        )?;
                        (z * log_variance.affine(0.5, 0.0)?.exp()?)?
                    }
                    (Variance::FixedLarge, _) => z.affine(beta_t.sqrt(), 0.0)?,
                    _ => z.affine(posterior_variance.max(1e-20).sqrt(), 0.0)?,
                };
                next = (next + scaled)?;
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
