//! UniPC (Zhao et al. 2023): the unified predictor UniP-p and corrector UniC-p in data
//! prediction form with B(h) = e^h - 1 ("bh2"), Algorithm 1 and section 3.
//!
//! The corrector reuses the model output at the predicted point, so it costs no extra
//! evaluation.

use super::dpm_solver::log_snr_coefficients;
use super::euler::SigmaGrid;
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::diffusion::schedule::prediction;
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BFunction {
    /// B(h) = h.
    Bh1,
    /// B(h) = e^h - 1.
    Bh2,
}

pub struct UniPc {
    pub grid: SigmaGrid,
    pub order: usize,
    pub b_function: BFunction,
    pub lower_order_final: bool,
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|i, j| a[*i][col].abs().total_cmp(&a[*j][col].abs()))
            .expect("non-empty");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (entry, pivot_entry) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *entry -= f * pivot_entry;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// The coefficients shared by UniP and UniC: rows R_p = r_k^(p-1) and b_p = phi_p(h) p! / B(h)
/// (Zhao et al. 2023, eq. 8 with the phi functions of DPM-Solver).
struct UniCoefficients {
    h_phi_1: f64,
    b_h: f64,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

fn uni_coefficients(rks: &[f64], h: f64, b_function: BFunction) -> UniCoefficients {
    let order = rks.len();
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let b_h = match b_function {
        BFunction::Bh1 => hh,
        BFunction::Bh2 => hh.exp_m1(),
    };
    let mut factorial = 1.0;
    let mut r = Vec::with_capacity(order);
    let mut b = Vec::with_capacity(order);
    for p in 1..=order {
        r.push(rks.iter().map(|rk| rk.powi(p as i32 - 1)).collect());
        b.push(h_phi_k * factorial / b_h);
        factorial *= (p + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    UniCoefficients { h_phi_1, b_h, r, b }
}

impl UniPc {
    /// r_k and D1_k = (m_k - m_0) / r_k for the `order - 1` earlier outputs; `offset` is how
    /// many grid points back the first of them lies (1 for UniP, 2 for UniC).
    fn differences(
        &self,
        history: &[Tensor],
        order: usize,
        i: usize,
        offset: usize,
        lambda_s0: f64,
        h: f64,
    ) -> Result<(Vec<f64>, Vec<Tensor>)> {
        let m0 = history.last().expect("history has the current output");
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (_, _, lambda_k) = log_snr_coefficients(self.grid.sigmas[i + 1 - offset - k]);
            let rk = (lambda_k - lambda_s0) / h;
            let mk = &history[history.len() - 1 - k];
            d1s.push((mk - m0)?.affine(1.0 / rk, 0.0)?);
            rks.push(rk);
        }
        rks.push(1.0);
        Ok((rks, d1s))
    }

    /// UniP-p: x at sigmas[i + 1] from x at sigmas[i].
    fn predict(&self, x: &Tensor, history: &[Tensor], order: usize, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = log_snr_coefficients(self.grid.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = log_snr_coefficients(self.grid.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let (rks, d1s) = self.differences(history, order, i, 1, lambda_s0, h)?;
        let c = uni_coefficients(&rks, h, self.b_function);
        let m0 = history.last().expect("non-empty");
        let mut terms: Vec<(f64, &Tensor)> =
            vec![(sigma_t / sigma_s0, x), (-alpha_t * c.h_phi_1, m0)];
        let rhos: Vec<f64> = match d1s.len() {
            0 => vec![],
            1 => vec![0.5],
            k => {
                let r: Vec<Vec<f64>> = c.r[..k].iter().map(|row| row[..k].to_vec()).collect();
                solve(r, c.b[..k].to_vec())
            }
        };
        for (rho, d1) in rhos.iter().zip(&d1s) {
            terms.push((-alpha_t * c.b_h * rho, d1));
        }
        lincomb(&terms)
    }

    /// UniC-p: corrects x at sigmas[i] using the model output there (`this_output`).
    fn correct(
        &self,
        this_output: &Tensor,
        last_sample: &Tensor,
        history: &[Tensor],
        order: usize,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = log_snr_coefficients(self.grid.sigmas[i]);
        let (_, sigma_s0, lambda_s0) = log_snr_coefficients(self.grid.sigmas[i - 1]);
        let h = lambda_t - lambda_s0;
        let (rks, d1s) = self.differences(history, order, i, 2, lambda_s0, h)?;
        let c = uni_coefficients(&rks, h, self.b_function);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())
        };
        let m0 = history.last().expect("non-empty");
        let d1_t = (this_output - m0)?;
        let scale = -alpha_t * c.b_h;
        let mut terms: Vec<(f64, &Tensor)> = vec![
            (sigma_t / sigma_s0, last_sample),
            (-alpha_t * c.h_phi_1, m0),
            (scale * rhos[rhos.len() - 1], &d1_t),
        ];
        for (rho, d1) in rhos.iter().zip(&d1s) {
            terms.push((scale * rho, d1));
        }
        lincomb(&terms)
    }
}

impl Sampler for UniPc {
    fn name(&self) -> &'static str {
        super::SamplerKind::UniPc.cli_name()
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
        let n = self.grid.steps();
        let mut history: Vec<Tensor> = Vec::new();
        let mut last_sample: Option<Tensor> = None;
        let mut this_order = 0;
        for (i, &t) in self.grid.timesteps.iter().enumerate() {
            let (alpha_s, sigma_s, _) = log_snr_coefficients(self.grid.sigmas[i]);
            let output = model.predict(&x, t)?;
            let x0 = prediction::to_x0(model.prediction_type(), &output, &x, alpha_s, sigma_s)?;
            if let Some(last) = &last_sample {
                x = self.correct(&x0, last, &history, this_order, i)?;
            }
            history.push(x0.clone());
            if history.len() > self.order {
                history.remove(0);
            }
            let mut order = self.order;
            if self.lower_order_final {
                order = order.min(n - i);
            }
            // Warm-up: only as many earlier outputs as exist.
            this_order = order.min(i + 1);
            last_sample = Some(x.clone());
            x = self.predict(&x, &history, this_order, i)?;
            x = model.after_step(i, x)?;
            callback(&StepEvent {
                index: i,
                total: n,
                t,
                sample: &x,
                pred_original: Some(&x0),
            })?;
        }
        Ok(x)
    }
}
