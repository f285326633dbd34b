//! DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", Algorithm 2: the multistep second-order
//! data-prediction solver, "2M"), with its first-order special case (equivalent to DDIM).
//!
//! Works on the VP sample x_t in log-SNR time lambda = log(alpha_t / sigma_t).

use super::euler::{vp_coefficients, SigmaGrid};
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::prediction;
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

/// How the second-order correction D1 enters the update (diffusers' `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondOrderForm {
    Midpoint,
    Heun,
}

pub struct DpmSolverPlusPlus {
    pub grid: SigmaGrid,
    /// 1 or 2.
    pub order: usize,
    pub form: SecondOrderForm,
    /// Use the first-order update on the last step (stabilises few-step sampling).
    pub lower_order_final: bool,
}

/// (alpha_t, sigma_t, lambda_t) of the VP process at VE noise level `sigma`.
pub(crate) fn log_snr_coefficients(sigma: f64) -> (f64, f64, f64) {
    let (alpha, sigma_vp) = vp_coefficients(sigma);
    (alpha, sigma_vp, alpha.ln() - sigma_vp.ln())
}

impl Sampler for DpmSolverPlusPlus {
    fn name(&self) -> &'static str {
        super::SamplerKind::DpmPp2m.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn timesteps(&self) -> Vec<f64> {
        self.grid.timesteps.clone()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.grid.sigmas.clone())
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.grid.add_noise_vp(x0, noise, index)
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
        let n = self.grid.steps();
        let mut previous_x0: Option<Tensor> = None;
        for (i, &t) in self.grid.timesteps.iter().enumerate() {
            let (alpha_s, sigma_s, lambda_s) = log_snr_coefficients(sigmas[i]);
            let output = model.predict(&x, t)?;
            let x0 = prediction::to_x0(model.prediction_type(), &output, &x, alpha_s, sigma_s)?;
            let (alpha_t, sigma_t, lambda_t) = log_snr_coefficients(sigmas[i + 1]);
            let h = lambda_t - lambda_s;
            // DPM-Solver++ eq. 9: the first-order data-prediction update.
            let phi = alpha_t * (-h).exp_m1();
            let first_order = self.order == 1
                || previous_x0.is_none()
                || (i == n - 1 && (self.lower_order_final || sigmas[i + 1] == 0.0));
            let next = if first_order {
                lincomb(&[(sigma_t / sigma_s, &x), (-phi, &x0)])?
            } else {
                let prev = previous_x0.as_ref().expect("checked above");
                let (_, _, lambda_prev) = log_snr_coefficients(sigmas[i - 1]);
                let r = (lambda_s - lambda_prev) / h;
                // D1 = (x0 - x0_prev) / r; the 2M update of Algorithm 2.
                let d1_coeff = match self.form {
                    SecondOrderForm::Midpoint => -0.5 * phi,
                    SecondOrderForm::Heun => alpha_t * ((-h).exp_m1() / h + 1.0),
                };
                lincomb(&[
                    (sigma_t / sigma_s, &x),
                    (-phi + d1_coeff / r, &x0),
                    (-d1_coeff / r, prev),
                ])?
            };
            x = model.after_step(i, next)?;
            callback(&StepEvent {
                index: i,
                total: n,
                t,
                sample: &x,
                pred_original: Some(&x0),
            })?;
            previous_x0 = Some(x0);
        }
        Ok(x)
    }
}
