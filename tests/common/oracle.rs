//! The ideal denoiser for Gaussian data, x_0 ~ N(mu, s^2 I), where every sampler's target is
//! known in closed form.

use candle_core::{Result, Tensor};

/// How the model's time label maps to the forward kernel x_t = alpha x_0 + sigma eps.
pub enum Labels {
    /// A discrete DDPM schedule: the label is a (possibly fractional) training timestep and
    /// sigma_VE is interpolated in the schedule's sigma table as the samplers do.
    Discrete(Vec<f64>),
    /// A continuous VP SDE with linear beta: the label is t.
    VpLinear { beta_min: f64, beta_max: f64 },
    /// A VE SDE: the label is sigma itself.
    Ve,
}

pub struct GaussianOracle {
    pub mu: f64,
    pub s: f64,
    pub labels: Labels,
}

impl GaussianOracle {
    /// (alpha_t, sigma_t) of the kernel at a label.
    pub fn kernel(&self, label: f64) -> (f64, f64) {
        match &self.labels {
            Labels::Discrete(sigmas) => {
                let sigma_ve = diffuse::diffusion::schedule::interp(label, sigmas);
                let alpha = 1.0 / (1.0 + sigma_ve * sigma_ve).sqrt();
                (alpha, sigma_ve * alpha)
            }
            Labels::VpLinear { beta_min, beta_max } => {
                let log_alpha_bar = -0.5 * label * label * (beta_max - beta_min) - label * beta_min;
                (
                    (0.5 * log_alpha_bar).exp(),
                    (1.0 - log_alpha_bar.exp()).sqrt(),
                )
            }
            Labels::Ve => (1.0, label),
        }
    }

    /// E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).
    pub fn epsilon(&self, x: &Tensor, label: f64) -> Result<Tensor> {
        let (alpha, sigma) = self.kernel(label);
        let var = alpha * alpha * self.s * self.s + sigma * sigma;
        x.affine(sigma / var, -sigma * alpha * self.mu / var)
    }

    /// grad log p_t(x) = -(x - alpha mu) / (alpha^2 s^2 + sigma^2).
    pub fn score(&self, x: &Tensor, label: f64) -> Result<Tensor> {
        let (alpha, sigma) = self.kernel(label);
        let var = alpha * alpha * self.s * self.s + sigma * sigma;
        x.affine(-1.0 / var, alpha * self.mu / var)
    }

    /// The probability-flow ODE's exact solution in VE form: x_sigma - mu scales with
    /// sqrt(s^2 + sigma^2).
    pub fn ode_solution(
        &self,
        x_start: &Tensor,
        sigma_start: f64,
        sigma_end: f64,
    ) -> Result<Tensor> {
        let ratio = ((self.s * self.s + sigma_end * sigma_end)
            / (self.s * self.s + sigma_start * sigma_start))
            .sqrt();
        x_start.affine(ratio, self.mu * (1.0 - ratio))
    }
}

/// Mean and standard deviation of all entries.
pub fn mean_std(x: &Tensor) -> (f64, f64) {
    let v: Vec<f64> = x
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}
