//! Likelihood of data under a DDPM: the variational bound's terms (Ho et al. 2020, eq. 5 and
//! section 3.3; Nichol & Dhariwal 2021, section 2) in bits per dimension, shared by the hybrid
//! training loss and `diffuse eval`; and the exact likelihood of the probability-flow ODE
//! (Song et al. 2021, section 4.3 and appendix D.2).

use crate::sampler::ddpm::{split_learned_variance, VarianceType};
use crate::schedule::{per_row, NoiseSchedule};
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
        variance: VarianceType,
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
            (VarianceType::LearnedRange, Some(v)) => {
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
            (VarianceType::FixedLarge, _) => {
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
