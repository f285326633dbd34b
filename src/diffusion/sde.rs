//! Score SDEs (Song et al. 2021): the variance-preserving and variance-exploding processes.
//!
//! An SDE dx = f(x, t) dt + g(t) dw on t in [0, 1] with linear drift f(x, t) = f(t) x. Its
//! reverse (eq. 6) is dx = [f(t) x - g(t)^2 grad log p_t(x)] dt + g(t) dw_bar.

use crate::diffusion::schedule::{interp, prediction, NoiseSchedule, PredictionType};
use candle_core::{Result, Tensor};

/// One step of an SDE's time discretisation, x_{i+1} = x_i + f_i x_i + G_i z (Song et al.
/// 2021, eq. 45 and appendix E): the form the reverse-diffusion predictor inverts.
#[derive(Debug, Clone, Copy)]
pub struct Discretisation {
    pub drift_coeff: f64,
    pub diffusion: f64,
}

pub trait Sde {
    /// (mean coefficient, std) of the perturbation kernel p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I).
    fn marginal(&self, t: f64) -> (f64, f64);
    /// (f(t), g(t)) of the forward SDE.
    fn drift_diffusion(&self, t: f64) -> (f64, f64);
    /// The discrete step that takes the process from `t_next` up to `t` (`t_next < t`);
    /// `index` is t's position in a grid of `n` points from 1 down to the sampling epsilon.
    fn discretise(&self, t: f64, t_next: f64, index: usize, n: usize) -> Discretisation;
    /// The time label the network takes at time t.
    fn model_time(&self, t: f64) -> f64;
    /// The alpha_i that scales the Langevin step (Song et al. 2021, Algorithm 5; 1 for VE).
    fn langevin_alpha(&self, t: f64, t_next: f64) -> f64;
    /// Standard deviation of the prior p_1.
    fn prior_std(&self) -> f64;
    /// Smallest time the samplers integrate to.
    fn sampling_eps(&self) -> f64;

    /// grad log p_t(x) from the network's output, whatever it predicts.
    fn score(&self, kind: PredictionType, output: &Tensor, x: &Tensor, t: f64) -> Result<Tensor> {
        if kind == PredictionType::Score {
            return Ok(output.clone());
        }
        let (mean, std) = self.marginal(t);
        let eps = prediction::to_eps(kind, output, x, mean, std)?;
        eps.affine(-1.0 / std, 0.0)
    }
}

/// How beta(t) of a VP SDE is given.
#[derive(Debug, Clone)]
pub enum VpBeta {
    /// beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 32); the network
    /// takes the continuous t.
    Linear { beta_min: f64, beta_max: f64 },
    /// The continuous limit of a discrete DDPM schedule: alpha_bar(t) interpolated in the table
    /// at timestep t (N - 1); the network takes that timestep.
    Table(NoiseSchedule),
}

/// The variance-preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (Song et al. 2021,
/// eq. 11), the continuous form of DDPM.
#[derive(Debug, Clone)]
pub struct VpSde {
    pub beta: VpBeta,
    pub sampling_eps: f64,
}

impl VpSde {
    fn table_position(schedule: &NoiseSchedule, t: f64) -> f64 {
        t * (schedule.num_train_timesteps() - 1) as f64
    }

    fn log_alpha_bar(&self, t: f64) -> f64 {
        match &self.beta {
            VpBeta::Linear { beta_min, beta_max } => {
                -0.5 * t * t * (beta_max - beta_min) - t * beta_min
            }
            VpBeta::Table(schedule) => {
                let sigma = interp(Self::table_position(schedule, t), &schedule.sigmas());
                -(1.0 + sigma * sigma).ln()
            }
        }
    }

    fn beta_at(&self, t: f64) -> f64 {
        match &self.beta {
            VpBeta::Linear { beta_min, beta_max } => beta_min + t * (beta_max - beta_min),
            VpBeta::Table(schedule) => {
                // -d log alpha_bar / dt, piecewise constant between table entries.
                let n = schedule.num_train_timesteps();
                let k = (Self::table_position(schedule, t).floor() as usize).min(n - 2);
                let a = &schedule.alphas_cumprod;
                (n - 1) as f64 * (a[k].ln() - a[k + 1].ln())
            }
        }
    }
}

impl Sde for VpSde {
    fn marginal(&self, t: f64) -> (f64, f64) {
        let log_alpha_bar = self.log_alpha_bar(t);
        (
            (0.5 * log_alpha_bar).exp(),
            (-log_alpha_bar.exp_m1()).max(0.0).sqrt(),
        )
    }

    fn drift_diffusion(&self, t: f64) -> (f64, f64) {
        let beta = self.beta_at(t);
        (-0.5 * beta, beta.sqrt())
    }

    /// x_t = sqrt(1 - beta_i) x_{t_next} + sqrt(beta_i) z with 1 - beta_i = alpha_bar(t) /
    /// alpha_bar(t_next): DDPM's step, strided when the grid is coarser than training.
    fn discretise(&self, t: f64, t_next: f64, _index: usize, _n: usize) -> Discretisation {
        let alpha = (self.log_alpha_bar(t) - self.log_alpha_bar(t_next)).exp();
        Discretisation {
            drift_coeff: alpha.sqrt() - 1.0,
            diffusion: (1.0 - alpha).max(0.0).sqrt(),
        }
    }

    fn model_time(&self, t: f64) -> f64 {
        match &self.beta {
            VpBeta::Linear { .. } => t,
            VpBeta::Table(schedule) => Self::table_position(schedule, t),
        }
    }

    fn langevin_alpha(&self, t: f64, t_next: f64) -> f64 {
        (self.log_alpha_bar(t) - self.log_alpha_bar(t_next)).exp()
    }

    fn prior_std(&self) -> f64 {
        1.0
    }

    fn sampling_eps(&self) -> f64 {
        self.sampling_eps
    }
}

/// The variance-exploding SDE dx = sqrt(d sigma^2(t) / dt) dw with sigma(t) = sigma_min
/// (sigma_max / sigma_min)^t (Song et al. 2021, eq. 30), the continuous form of NCSN/SMLD.
#[derive(Debug, Clone)]
pub struct VeSde {
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub sampling_eps: f64,
}

impl VeSde {
    pub fn sigma(&self, t: f64) -> f64 {
        self.sigma_min * (self.sigma_max / self.sigma_min).powf(t)
    }

    /// The n noise levels of SMLD, geometric from sigma_min to sigma_max.
    fn discrete_sigma(&self, index: usize, n: usize) -> f64 {
        let (lo, hi) = (self.sigma_min.ln(), self.sigma_max.ln());
        let frac = if n > 1 {
            index as f64 / (n - 1) as f64
        } else {
            1.0
        };
        (lo + frac * (hi - lo)).exp()
    }
}

impl Sde for VeSde {
    fn marginal(&self, t: f64) -> (f64, f64) {
        (1.0, self.sigma(t))
    }

    fn drift_diffusion(&self, t: f64) -> (f64, f64) {
        let log_ratio = (self.sigma_max / self.sigma_min).ln();
        (0.0, self.sigma(t) * (2.0 * log_ratio).sqrt())
    }

    /// SMLD's step between adjacent geometric noise levels (Song et al. 2021, eq. 46), indexed
    /// by trunc(t (n - 1)) as the reference implementation does.
    fn discretise(&self, t: f64, _t_next: f64, _index: usize, n: usize) -> Discretisation {
        let level = (t * (n - 1) as f64) as usize;
        let sigma = self.discrete_sigma(level, n);
        let adjacent = if level == 0 {
            0.0
        } else {
            self.discrete_sigma(level - 1, n)
        };
        Discretisation {
            drift_coeff: 0.0,
            diffusion: (sigma * sigma - adjacent * adjacent).max(0.0).sqrt(),
        }
    }

    fn model_time(&self, t: f64) -> f64 {
        self.sigma(t)
    }

    fn langevin_alpha(&self, _t: f64, _t_next: f64) -> f64 {
        1.0
    }

    fn prior_std(&self) -> f64 {
        self.sigma_max
    }

    fn sampling_eps(&self) -> f64 {
        self.sampling_eps
    }
}
