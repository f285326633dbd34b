//! Likelihood of data under a DDPM: the variational bound's terms (Ho et al. 2020, eq. 5 and
//! section 3.3; Nichol & Dhariwal 2021, section 2) in bits per dimension, shared by the hybrid
//! training loss and `diffuse eval`; and the exact likelihood of the probability-flow ODE
//! (Song et al. 2021, section 4.3 and appendix D.2).

use crate::diffusion::schedule::{per_row, NoiseSchedule};
use crate::diffusion::variance::{split_learned_variance, Variance};
use candle_core::{Result, Tensor};
use std::f64::consts::LN_2;

/// KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)) elementwise, in nats.
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    let ratio = (logvar1 - logvar2)?.exp()?;
    let mean_term = (mean1 - mean2)?
        .sqr()?
        .broadcast_mul(&logvar2.neg()?.exp()?)?;
    let log_term = (logvar2 - logvar1)?;
    ((ratio + mean_term)? + log_term)?.affine(0.5, -0.5)
}

/// Phi(x) by the tanh approximation improved-diffusion uses (differentiable, and telescoping
/// exactly over adjacent bins, so the 256 bin probabilities sum to one).
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let cubic = (x + x.powf(3.0)?.affine(0.044715, 0.0)?)?;
    cubic
        .affine((2.0 / std::f64::consts::PI).sqrt(), 0.0)?
        .tanh()?
        .affine(0.5, 0.5)
}

/// log P(x) of 8-bit data x in [-1, 1] under the discretised Gaussian decoder of DDPM section 3.3:
/// the Gaussian's mass over the bin [x - 1/255, x + 1/255], with the edge bins extended to
/// -inf and +inf (eq. 13). `log_scale` is log sigma (half the log variance). Nats, elementwise.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    let centered = (x - mean)?;
    let inv_stdv = log_scale.neg()?.exp()?;
    let upper = approx_standard_normal_cdf(&(centered.affine(1.0, 1.0 / 255.0)? * &inv_stdv)?)?;
    let lower = approx_standard_normal_cdf(&(centered.affine(1.0, -1.0 / 255.0)? * &inv_stdv)?)?;
    let log_cdf_upper = upper.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_one_minus_lower = lower
        .affine(-1.0, 1.0)?
        .clamp(1e-12, f64::INFINITY)?
        .log()?;
    let log_delta = (upper - lower)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let is_lowest = x.lt(-0.999)?;
    let is_highest = x.gt(0.999)?;
    is_lowest.where_cond(
        &log_cdf_upper,
        &is_highest.where_cond(&log_one_minus_lower, &log_delta)?,
    )
}

/// Mean over all but the batch dimension, converted from nats to bits.
pub fn mean_bits(nats: &Tensor) -> Result<Tensor> {
    nats.flatten_from(1)?.mean(1)?.affine(1.0 / LN_2, 0.0)
}

/// The per-timestep constants of the forward process and its posterior q(x_{t-1} | x_t, x_0)
/// (DDPM eq. 6-7), in f64.
#[derive(Debug, Clone)]
pub struct DiffusionTables {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    /// log beta~_t with t = 0 (beta~_0 = 0) replaced by t = 1, as improved-diffusion does.
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef_x0: Vec<f64>,
    pub posterior_mean_coef_xt: Vec<f64>,
}

impl DiffusionTables {
    pub fn new(schedule: &NoiseSchedule) -> Self {
        let betas = schedule.betas.clone();
        let ab = schedule.alphas_cumprod.clone();
        let n = betas.len();
        let ab_prev = |t: usize| if t == 0 { 1.0 } else { ab[t - 1] };
        let posterior_variance: Vec<f64> = (0..n)
            .map(|t| betas[t] * (1.0 - ab_prev(t)) / (1.0 - ab[t]))
            .collect();
        let posterior_log_variance_clipped = (0..n)
            .map(|t| {
                let v = if t == 0 && n > 1 {
                    posterior_variance[1]
                } else {
                    posterior_variance[t]
                };
                v.max(1e-20).ln()
            })
            .collect();
        let posterior_mean_coef_x0 = (0..n)
            .map(|t| betas[t] * ab_prev(t).sqrt() / (1.0 - ab[t]))
            .collect();
        let posterior_mean_coef_xt = (0..n)
            .map(|t| (1.0 - ab_prev(t)) * (1.0 - betas[t]).sqrt() / (1.0 - ab[t]))
            .collect();
        Self {
            betas,
            alphas_cumprod: ab,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef_x0,
            posterior_mean_coef_xt,
        }
    }

    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    fn rows(&self, table: &[f64], timesteps: &[usize], like: &Tensor) -> Result<Tensor> {
        per_row(timesteps.iter().map(|t| table[*t] as f32).collect(), like)
    }

    /// Mean and log variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 7).
    pub fn q_posterior(
        &self,
        x0: &Tensor,
        xt: &Tensor,
        timesteps: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let mean =
            (x0.broadcast_mul(&self.rows(&self.posterior_mean_coef_x0, timesteps, x0)?)?
                + xt.broadcast_mul(&self.rows(&self.posterior_mean_coef_xt, timesteps, xt)?)?)?;
        let log_variance = self
            .rows(&self.posterior_log_variance_clipped, timesteps, x0)?
            .broadcast_as(x0.shape())?
            .contiguous()?;
        Ok((mean, log_variance))
    }

    /// Mean and log variance of p_theta(x_{t-1} | x_t) from an epsilon-predicting network's raw
    /// output: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (eq. 15), clipped to [-1, 1]
    /// when `clip`, then the posterior mean at that x_0 (eq. 7); the variance fixed or learned.
    pub fn p_mean_variance(
        &self,
        output: &Tensor,
        xt: &Tensor,
        timesteps: &[usize],
        variance: Variance,
        clip: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (eps, v) = if variance.is_learned() {
            let (eps, v) = split_learned_variance(output)?;
            (eps, Some(v))
        } else {
            (output.clone(), None)
        };
        let recip = |t: &usize| (1.0 / self.alphas_cumprod[*t]).sqrt() as f32;
        let recip_m1 = |t: &usize| (1.0 / self.alphas_cumprod[*t] - 1.0).sqrt() as f32;
        let x0 = (xt.broadcast_mul(&per_row(timesteps.iter().map(recip).collect(), xt)?)?
            - eps.broadcast_mul(&per_row(timesteps.iter().map(recip_m1).collect(), xt)?)?)?;
        let x0 = if clip { x0.clamp(-1f32, 1f32)? } else { x0 };
        let (mean, _) = self.q_posterior(&x0, xt, timesteps)?;
        let log_variance = match (variance, v) {
            (Variance::LearnedRange, Some(v)) => {
                // Eq. 15 row by row, with each row's bounds.
                let min_log = self.rows(&self.posterior_log_variance_clipped, timesteps, &v)?;
                let max_log = per_row(
                    timesteps
                        .iter()
                        .map(|t| self.betas[*t].ln() as f32)
                        .collect(),
                    &v,
                )?;
                let frac = v.affine(0.5, 0.5)?;
                (frac.broadcast_mul(&max_log)?
                    + frac.affine(-1.0, 1.0)?.broadcast_mul(&min_log)?)?
            }
            (Variance::FixedLarge, _) => {
                // beta_t, with beta~_1 at t = 0 so that the decoder is not degenerate.
                let table: Vec<f64> = (0..self.num_timesteps())
                    .map(|t| {
                        if t == 0 {
                            self.posterior_variance[1.min(self.num_timesteps() - 1)]
                        } else {
                            self.betas[t]
                        }
                        .ln()
                    })
                    .collect();
                self.rows(&table, timesteps, xt)?
                    .broadcast_as(xt.shape())?
                    .contiguous()?
            }
            _ => self
                .rows(&self.posterior_log_variance_clipped, timesteps, xt)?
                .broadcast_as(xt.shape())?
                .contiguous()?,
        };
        Ok((mean, log_variance))
    }

    /// The bound's term at each row's timestep, in bits per dimension (B,): L_{t-1} =
    /// KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder's -log p(x_0 | x_1)
    /// for t = 0 (DDPM eq. 5).
    pub fn vb_term_bits(
        &self,
        x0: &Tensor,
        xt: &Tensor,
        timesteps: &[usize],
        model_mean: &Tensor,
        model_log_variance: &Tensor,
    ) -> Result<Tensor> {
        let (true_mean, true_log_variance) = self.q_posterior(x0, xt, timesteps)?;
        let kl = mean_bits(&normal_kl(
            &true_mean,
            &true_log_variance,
            model_mean,
            model_log_variance,
        )?)?;
        let decoder_nll = mean_bits(
            &discretized_gaussian_log_likelihood(
                x0,
                model_mean,
                &model_log_variance.affine(0.5, 0.0)?,
            )?
            .neg()?,
        )?;
        let is_first = Tensor::from_vec(
            timesteps
                .iter()
                .map(|t| u8::from(*t == 0))
                .collect::<Vec<u8>>(),
            timesteps.len(),
            x0.device(),
        )?;
        is_first.where_cond(&decoder_nll, &kl)
    }

    /// L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension (B,).
    pub fn prior_bits(&self, x0: &Tensor) -> Result<Tensor> {
        let last = self.alphas_cumprod[self.num_timesteps() - 1];
        let mean = x0.affine(last.sqrt(), 0.0)?;
        let log_variance = x0.ones_like()?.affine((1.0 - last).ln(), 0.0)?;
        let zeros = x0.zeros_like()?;
        mean_bits(&normal_kl(&mean, &log_variance, &zeros, &zeros)?)
    }
}

/// The exact negative log-likelihood of each row, in bits per dimension, from the probability-
/// flow ODE of a VP SDE (Song et al. 2021, section 4.3 and appendix D.2).
#[derive(Debug, Clone)]
pub struct OdeLikelihood {
    pub bits_per_dim: Vec<f64>,
    pub evaluations: usize,
}

/// Integrates dx/dt = -beta(t)/2 (x - eps(x, t) / sigma(t)) (the probability-flow ODE, Song et
/// al. eq. 13, with the score -eps / sigma) from `t_min` to 1 together with the log-density change
/// d log p / dt = -div f, whose divergence Hutchinson's estimator gives as z^T (d f / d x) z
/// (one fixed `probe` z for the whole solve, as the paper does). Then
/// log p_0(x) = log N(x_1; 0, I) + integral of div f, and for data dequantised from 8 bits and
/// scaled by 2 to [-1, 1], bits/dim = -log p_0 / (D ln 2) + 8 - 1.
///
/// `eps_model(x, t)` must be differentiable in `x` (the model's weights plain tensors).
pub fn ode_bits_per_dim(
    eps_model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    sde: &crate::diffusion::sde::VpSde,
    x: &Tensor,
    probe: &Tensor,
    t_min: f64,
    tolerance: crate::ops::ode::Tolerance,
) -> Result<OdeLikelihood> {
    use crate::diffusion::sde::Sde;
    let shape = x.shape().clone();
    let batch = x.dim(0)?;
    let dims = x.elem_count() / batch;
    let state = Tensor::cat(
        &[
            &x.flatten_from(1)?,
            &Tensor::zeros((batch, 1), x.dtype(), x.device())?,
        ],
        1,
    )?;
    let mut evaluations = 0usize;
    let mut slope = |state: &Tensor, t: f64| -> Result<Tensor> {
        evaluations += 1;
        let x = candle_core::Var::from_tensor(&state.narrow(1, 0, dims)?.reshape(&shape)?)?;
        let eps = eps_model(x.as_tensor(), t)?;
        let (_, sigma) = sde.marginal(t);
        let (drift_coeff, _) = sde.drift_diffusion(t);
        let grads = (&eps * probe)?.sum_all()?.backward()?;
        let Some(jvp) = grads.get(&x) else {
            candle_core::bail!("the model's output does not depend on its input")
        };
        let div_eps = (jvp * probe)?.flatten_from(1)?.sum(1)?;
        let eps = eps.detach();
        // drift = c (x - eps / sigma) with c = -beta / 2; div drift = c (D - div eps / sigma).
        let drift =
            (x.as_tensor().detach() - eps.affine(1.0 / sigma, 0.0)?)?.affine(drift_coeff, 0.0)?;
        let divergence = div_eps.affine(-drift_coeff / sigma, drift_coeff * dims as f64)?;
        Tensor::cat(&[&drift.flatten_from(1)?, &divergence.unsqueeze(1)?], 1)
    };
    let end = crate::ops::ode::dormand_prince(
        &mut slope,
        state,
        (t_min, 1.0),
        tolerance,
        &mut |_, _, _| Ok(()),
    )?;
    let x_end = end.narrow(1, 0, dims)?.to_dtype(candle_core::DType::F64)?;
    let delta = end
        .narrow(1, dims, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let squared = x_end.sqr()?.sum(1)?.to_vec1::<f64>()?;
    let log_2pi = (2.0 * std::f64::consts::PI).ln();
    let bits_per_dim = squared
        .iter()
        .zip(&delta)
        .map(|(sq, d)| {
            let prior = -0.5 * dims as f64 * log_2pi - 0.5 * sq;
            -(prior + d) / (dims as f64 * LN_2) + 7.0
        })
        .collect();
    Ok(OdeLikelihood {
        bits_per_dim,
        evaluations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::BetaSchedule;
    use crate::diffusion::sde::{Sde, VpBeta, VpSde};
    use crate::ops::ode::Tolerance;
    use candle_core::Device;

    fn scalar(values: &[f32]) -> Tensor {
        Tensor::from_vec(values.to_vec(), (values.len(), 1, 1, 1), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    #[test]
    fn decoder_bins_sum_to_one_and_edges_reach_infinity() {
        // All 256 values of one pixel under N(mean, sigma): the extended edge bins make the
        // probabilities telescope to exactly one.
        for (mean, log_scale) in [(0.0f32, -1.0f32), (0.9, -1.5), (-1.2, 0.5)] {
            let pixels: Vec<f32> = (0..256).map(|v| v as f32 / 127.5 - 1.0).collect();
            let x = Tensor::from_vec(pixels.clone(), 256, &Device::Cpu).unwrap();
            let means = Tensor::full(mean, 256, &Device::Cpu).unwrap();
            let scales = Tensor::full(log_scale, 256, &Device::Cpu).unwrap();
            let log_p = discretized_gaussian_log_likelihood(&x, &means, &scales).unwrap();
            let total: f64 = values(&log_p).iter().map(|l| l.exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "mean {mean}: {total}");
            // The lowest bin is P(X < -1 + 1/255), the highest P(X > 1 - 1/255).
            let cdf = |z: f64| {
                0.5 * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3))).tanh())
            };
            let sigma = (log_scale as f64).exp();
            // (Probabilities are floored at 1e-12, as in the implementation.)
            let low = cdf((-1.0 + 1.0 / 255.0 - mean as f64) / sigma)
                .max(1e-12)
                .ln();
            let high = (1.0 - cdf((1.0 - 1.0 / 255.0 - mean as f64) / sigma))
                .max(1e-12)
                .ln();
            let got = values(&log_p);
            assert!(
                (got[0] - low).abs() < 1e-4 * low.abs().max(1.0),
                "{} vs {low}",
                got[0]
            );
            assert!(
                (got[255] - high).abs() < 1e-4 * high.abs().max(1.0),
                "{} vs {high}",
                got[255]
            );
        }
    }

    #[test]
    fn vb_terms_match_a_direct_computation() {
        let schedule = NoiseSchedule::new(
            &BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            1000,
            false,
        )
        .unwrap();
        let tables = DiffusionTables::new(&schedule);
        let x0 = [0.5f32, -0.25];
        let xt = [0.3f32, 0.1];
        let eps = [0.2f32, -0.7];
        let timesteps = [10usize, 500];
        let (mean, log_variance) = tables
            .p_mean_variance(
                &scalar(&eps),
                &scalar(&xt),
                &timesteps,
                Variance::FixedSmall,
                false,
            )
            .unwrap();
        let got = values(
            &tables
                .vb_term_bits(&scalar(&x0), &scalar(&xt), &timesteps, &mean, &log_variance)
                .unwrap(),
        );
        for i in 0..2 {
            let t = timesteps[i];
            let ab = schedule.alphas_cumprod[t];
            let ab_prev = schedule.alphas_cumprod[t - 1];
            let beta = schedule.betas[t];
            let (x0, xt, eps) = (x0[i] as f64, xt[i] as f64, eps[i] as f64);
            // DDPM eq. 7 with the true x0 and with the model's x0 (eq. 15).
            let coef_x0 = beta * ab_prev.sqrt() / (1.0 - ab);
            let coef_xt = (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab);
            let variance = beta * (1.0 - ab_prev) / (1.0 - ab);
            let true_mean = coef_x0 * x0 + coef_xt * xt;
            let model_x0 = (xt - (1.0 - ab).sqrt() * eps) / ab.sqrt();
            let model_mean = coef_x0 * model_x0 + coef_xt * xt;
            // KL of two Gaussians with equal variance: (mu1 - mu2)^2 / (2 var), in bits.
            let expected = (true_mean - model_mean).powi(2) / (2.0 * variance) / LN_2;
            assert!(
                (got[i] - expected).abs() < 1e-3 * expected.max(1e-3),
                "t = {t}: {} vs {expected}",
                got[i]
            );
        }
        // The prior term: KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)).
        let prior = values(&tables.prior_bits(&scalar(&x0)).unwrap());
        let ab = *schedule.alphas_cumprod.last().unwrap();
        for i in 0..2 {
            let m = ab.sqrt() * x0[i] as f64;
            let v = 1.0 - ab;
            let expected = 0.5 * (v + m * m - 1.0 - v.ln()) / LN_2;
            assert!(
                (prior[i] - expected).abs() < 1e-6,
                "{} vs {expected}",
                prior[i]
            );
        }
    }

    /// With Gaussian data and its exact noise predictor, the ODE likelihood is the Gaussian's
    /// own density (the Rademacher probe makes Hutchinson exact for a diagonal Jacobian).
    #[test]
    fn ode_likelihood_of_gaussian_data_is_exact() {
        let sde = VpSde {
            beta: VpBeta::Linear {
                beta_min: 0.1,
                beta_max: 20.0,
            },
            sampling_eps: 1e-5,
        };
        let (data_mean, data_std) = (0.3f64, 0.5f64);
        let mut eps_model = |x: &Tensor, t: f64| -> candle_core::Result<Tensor> {
            let (a, sigma) = sde.marginal(t);
            let var = a * a * data_std * data_std + sigma * sigma;
            x.affine(sigma / var, -sigma * a * data_mean / var)
        };
        let x = Tensor::new(
            &[[0.1f32, -0.4, 0.9, 0.3], [0.0, 0.2, -0.1, 0.5]],
            &Device::Cpu,
        )
        .unwrap();
        let probe = Tensor::new(&[[1f32, -1., 1., -1.], [-1., -1., 1., 1.]], &Device::Cpu).unwrap();
        let result = ode_bits_per_dim(
            &mut eps_model,
            &sde,
            &x,
            &probe,
            1e-5,
            Tolerance {
                rtol: 1e-6,
                atol: 1e-6,
            },
        )
        .unwrap();
        let rows = x.to_vec2::<f32>().unwrap();
        for (row, bits) in rows.iter().zip(&result.bits_per_dim) {
            let d = row.len() as f64;
            let log_p: f64 = row
                .iter()
                .map(|v| {
                    let z = (*v as f64 - data_mean) / data_std;
                    -0.5 * z * z - data_std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
                })
                .sum();
            let expected = -log_p / (d * LN_2) + 7.0;
            assert!((bits - expected).abs() < 2e-3, "{bits} vs {expected}");
        }
        assert!(result.evaluations > 10);
    }
}
