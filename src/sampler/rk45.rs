//! Adaptive Dormand-Prince RK5(4) on the probability-flow ODE (Song et al. 2021, section 4.3,
//! which integrates it with scipy's RK45): the ODE dx/dsigma = (x - D(x; sigma)) / sigma is
//! integrated in s = ln sigma from sigma_max down to sigma_min, then x is denoised once.

use super::euler::{denoise, SigmaGrid};
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::schedule::NoiseSchedule;
use crate::tensor_ops::lincomb;
use candle_core::{Result, Tensor};
use std::cell::Cell;

pub struct Rk45 {
    pub schedule: NoiseSchedule,
    pub sigma_max: f64,
    pub sigma_min: f64,
    pub rtol: f64,
    pub atol: f64,
    /// Upper bound on model evaluations, so that a stiff case ends with an error, not a hang.
    pub max_evaluations: usize,
    evaluations: Cell<usize>,
}

// Dormand & Prince 1980, table 2 (the coefficients scipy's RK45 uses).
const C: [f64; 6] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0];
const A: [&[f64]; 6] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
];
const B5: [f64; 6] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
];
/// B5 - B4 over the seven stages (the seventh is the first-same-as-last evaluation).
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

impl Rk45 {
    pub fn new(grid: &SigmaGrid, schedule: NoiseSchedule, rtol: f64, atol: f64) -> Self {
        let sigma_max = grid.sigmas[0];
        let sigma_min = grid
            .sigmas
            .iter()
            .cloned()
            .filter(|s| *s > 0.0)
            .fold(f64::INFINITY, f64::min);
        Self {
            schedule,
            sigma_max,
            sigma_min,
            rtol,
            atol,
            max_evaluations: 100_000,
            evaluations: Cell::new(0),
        }
    }

    /// dx/ds = sigma dx/dsigma = x - D(x; sigma) at s = ln sigma.
    fn slope(&self, model: &mut dyn Denoiser, x: &Tensor, s: f64) -> Result<Tensor> {
        let n = self.evaluations.get() + 1;
        if n > self.max_evaluations {
            candle_core::bail!(
                "rk45 used {} model evaluations without reaching sigma_min; loosen --rtol/--atol",
                self.max_evaluations
            )
        }
        self.evaluations.set(n);
        let sigma = s.exp();
        let x0 = denoise(model, x, sigma, self.schedule.timestep_for_sigma(sigma))?;
        x - x0
    }

    /// Root mean square of `e / (atol + rtol max(|y|, |y_new|))`, scipy's error norm.
    fn error_norm(&self, e: &Tensor, y: &Tensor, y_new: &Tensor) -> Result<f64> {
        let scale = y
            .abs()?
            .maximum(&y_new.abs()?)?
            .affine(self.rtol, self.atol)?;
        let ratio = (e / scale)?.to_dtype(candle_core::DType::F64)?;
        Ok(ratio.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
    }

    fn rms(x: &Tensor) -> Result<f64> {
        Ok(x.to_dtype(candle_core::DType::F64)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f64>()?
            .sqrt())
    }
}

impl Sampler for Rk45 {
    fn name(&self) -> &'static str {
        "rk45"
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigma_max
    }

    fn timesteps(&self) -> Vec<f64> {
        vec![
            self.schedule.timestep_for_sigma(self.sigma_max),
            self.schedule.timestep_for_sigma(self.sigma_min),
        ]
    }

    fn last_evaluations(&self) -> Option<usize> {
        Some(self.evaluations.get())
    }

    fn sample(
        &self,
        model: &mut dyn Denoiser,
        mut x: Tensor,
        _noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor> {
        self.evaluations.set(0);
        let (mut s, s_end) = (self.sigma_max.ln(), self.sigma_min.ln());
        let direction = -1.0;
        let mut k1 = self.slope(model, &x, s)?;
        // Initial step as Hairer, Norsett & Wanner, section II.4 (scipy's select_initial_step).
        let scale = x.abs()?.affine(self.rtol, self.atol)?;
        let d0 = Self::rms(&(&x / &scale)?)?;
        let d1 = Self::rms(&(&k1 / &scale)?)?;
        let h0 = if d0 < 1e-5 || d1 < 1e-5 {
            1e-6
        } else {
            0.01 * d0 / d1
        };
        let x_probe = lincomb(&[(1.0, &x), (direction * h0, &k1)])?;
        let k_probe = self.slope(model, &x_probe, s + direction * h0)?;
        let d2 = Self::rms(&((&k_probe - &k1)? / &scale)?)? / h0;
        let h1 = if d1.max(d2) <= 1e-15 {
            (h0 * 1e-3).max(1e-6)
        } else {
            (0.01 / d1.max(d2)).powf(1.0 / 5.0)
        };
        let mut h = (100.0 * h0).min(h1).min(s - s_end);
        let mut accepted = 0;
        while s - s_end > 1e-12 {
            h = h.min(s - s_end);
            let mut stages: Vec<Tensor> = vec![k1.clone()];
            for stage in 1..6 {
                let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &x)];
                for (a, k) in A[stage].iter().zip(&stages) {
                    terms.push((direction * h * a, k));
                }
                let y_stage = lincomb(&terms)?;
                stages.push(self.slope(model, &y_stage, s + direction * h * C[stage])?);
            }
            let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &x)];
            for (b, k) in B5.iter().zip(&stages) {
                terms.push((direction * h * b, k));
            }
            let x_new = lincomb(&terms)?;
            let k7 = self.slope(model, &x_new, s + direction * h)?;
            stages.push(k7);
            let err_terms: Vec<(f64, &Tensor)> = E
                .iter()
                .zip(&stages)
                .map(|(e, k)| (direction * h * e, k))
                .collect();
            let err = lincomb(&err_terms)?;
            let norm = self.error_norm(&err, &x, &x_new)?;
            if norm <= 1.0 {
                s -= h;
                x = x_new;
                k1 = stages.pop().expect("seven stages");
                accepted += 1;
                callback(&StepEvent {
                    index: accepted - 1,
                    total: accepted,
                    t: self.schedule.timestep_for_sigma(s.exp()),
                    sample: &x,
                    pred_original: None,
                })?;
                let factor = if norm == 0.0 {
                    10.0
                } else {
                    (0.9 * norm.powf(-0.2)).clamp(0.2, 10.0)
                };
                h *= factor;
            } else {
                h *= (0.9 * norm.powf(-0.2)).max(0.2);
            }
            if !h.is_finite() || h < 1e-10 {
                candle_core::bail!("rk45 step size underflow at sigma = {}", s.exp())
            }
        }
        // Final denoising step from sigma_min (the reference implementation's `denoise=True`).
        let n = self.evaluations.get();
        self.evaluations.set(n + 1);
        denoise(
            model,
            &x,
            self.sigma_min,
            self.schedule.timestep_for_sigma(self.sigma_min),
        )
    }
}
