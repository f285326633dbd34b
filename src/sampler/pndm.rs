//! PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, eq. 12 with the
//! Adams-Bashforth weights of eq. 13), as Stable Diffusion's default scheduler runs it: the
//! Runge-Kutta warm-up is replaced by one Heun-like step (diffusers' `skip_prk_steps`).

use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::{prediction, NoiseSchedule};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

pub struct Plms {
    pub schedule: NoiseSchedule,
    /// Inference timesteps, largest first, before the repeated second entry is inserted.
    pub base_timesteps: Vec<usize>,
    /// Training steps between inference steps, T / steps.
    pub stride: usize,
    pub final_alpha_cumprod: f64,
}

impl Plms {
    /// The model-call timesteps: the second-to-last base step is visited twice for the warm-up.
    fn call_timesteps(&self) -> Vec<usize> {
        let mut ts = self.base_timesteps.clone();
        if ts.len() >= 2 {
            ts.insert(1, ts[1]);
        }
        ts
    }

    fn alpha_bar(&self, t: i64) -> f64 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// The pseudo-numerical transfer phi(x_t, eps, t -> t_prev) of PNDM eq. 11.
    fn transfer(&self, x: &Tensor, eps: &Tensor, t: i64, t_prev: i64) -> Result<Tensor> {
        let alpha_bar_t = self.alpha_bar(t);
        let alpha_bar_prev = self.alpha_bar(t_prev);
        let beta_bar_t = 1.0 - alpha_bar_t;
        let beta_bar_prev = 1.0 - alpha_bar_prev;
        let x_coeff = (alpha_bar_prev / alpha_bar_t).sqrt();
        let denom =
            alpha_bar_t * beta_bar_prev.sqrt() + (alpha_bar_t * beta_bar_t * alpha_bar_prev).sqrt();
        lincomb(&[(x_coeff, x), (-(alpha_bar_prev - alpha_bar_t) / denom, eps)])
    }
}

impl Sampler for Plms {
    fn name(&self) -> &'static str {
        super::SamplerKind::Pndm.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn timesteps(&self) -> Vec<f64> {
        self.call_timesteps().iter().map(|t| *t as f64).collect()
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        super::add_noise_at_timestep(
            &self.schedule.alphas_cumprod,
            &self.base_timesteps,
            x0,
            noise,
            index,
        )
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        _noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        let kind = model.prediction_type();
        let stride = self.stride as i64;
        let calls = self.call_timesteps();
        let mut eps_history: Vec<Tensor> = Vec::new();
        let mut warmup_start: Option<Tensor> = None;
        for (counter, &t_call) in calls.iter().enumerate() {
            // Outputs are combined raw and converted to epsilon once, at the step's start point,
            // as diffusers does (it matters for v-prediction only).
            let eps_now = model.predict(&x, t_call as f64)?;
            let (mut t, mut t_prev) = (t_call as i64, t_call as i64 - stride);
            if counter == 1 {
                // Second half of the warm-up: redo the first step with the averaged slope.
                t_prev = t;
                t += stride;
            } else {
                if eps_history.len() == 4 {
                    eps_history.remove(0);
                }
                eps_history.push(eps_now.clone());
            }
            let e = &eps_history;
            let n = e.len();
            let (eps, from) = match (counter, n) {
                (0, _) => {
                    warmup_start = Some(x.clone());
                    (eps_now, x.clone())
                }
                (1, _) => {
                    let start = warmup_start.take().expect("warm-up start recorded");
                    (lincomb(&[(0.5, &eps_now), (0.5, &e[n - 1])])?, start)
                }
                (_, 2) => (lincomb(&[(1.5, &e[1]), (-0.5, &e[0])])?, x.clone()),
                (_, 3) => (
                    lincomb(&[(23. / 12., &e[2]), (-16. / 12., &e[1]), (5. / 12., &e[0])])?,
                    x.clone(),
                ),
                _ => (
                    lincomb(&[
                        (55. / 24., &e[n - 1]),
                        (-59. / 24., &e[n - 2]),
                        (37. / 24., &e[n - 3]),
                        (-9. / 24., &e[n - 4]),
                    ])?,
                    x.clone(),
                ),
            };
            let alpha_bar = self.alpha_bar(t);
            let eps = prediction::to_eps(
                kind,
                &eps,
                &from,
                alpha_bar.sqrt(),
                (1.0 - alpha_bar).sqrt(),
            )?;
            x = self.transfer(&from, &eps, t, t_prev)?;
            callback(&StepEvent {
                index: counter,
                total: calls.len(),
                t: t_call as f64,
                sample: &x,
                pred_original: None,
            })?;
        }
        Ok(x)
    }
}
