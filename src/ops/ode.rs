//! Adaptive Dormand-Prince RK5(4) with scipy's step control (its RK45): the integrator of the
//! probability-flow sampler and of the ODE likelihood.

use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

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

/// RK45's error tolerances.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    /// Root mean square of `e / (atol + rtol max(|y|, |y_new|))`, scipy's error norm.
    fn error_norm(&self, e: &Tensor, y: &Tensor, y_new: &Tensor) -> Result<f64> {
        let scale = y
            .abs()?
            .maximum(&y_new.abs()?)?
            .affine(self.rtol, self.atol)?;
        let ratio = (e / scale)?.to_dtype(candle_core::DType::F64)?;
        Ok(ratio.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
    }
}

fn rms(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(candle_core::DType::F64)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// Integrates dy/ds = f(y, s) from `span.0` to `span.1` (either direction) with adaptive
/// Dormand-Prince RK5(4) and scipy's step control; `on_step(index, s, y)` sees each accepted
/// step. Shared by the probability-flow sampler and the ODE likelihood.
pub fn dormand_prince(
    f: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    mut y: Tensor,
    (mut s, s_end): (f64, f64),
    tol: Tolerance,
    on_step: &mut dyn FnMut(usize, f64, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let direction = if s_end < s { -1.0 } else { 1.0 };
    let remaining = |s: f64| direction * (s_end - s);
    let mut k1 = f(&y, s)?;
    // Initial step as Hairer, Norsett & Wanner, section II.4 (scipy's select_initial_step).
    let scale = y.abs()?.affine(tol.rtol, tol.atol)?;
    let d0 = rms(&(&y / &scale)?)?;
    let d1 = rms(&(&k1 / &scale)?)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let y_probe = lincomb(&[(1.0, &y), (direction * h0, &k1)])?;
    let k_probe = f(&y_probe, s + direction * h0)?;
    let d2 = rms(&((&k_probe - &k1)? / &scale)?)? / h0;
    let h1 = if d1.max(d2) <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / d1.max(d2)).powf(1.0 / 5.0)
    };
    let mut h = (100.0 * h0).min(h1).min(remaining(s));
    let mut accepted = 0;
    while remaining(s) > 1e-12 {
        h = h.min(remaining(s));
        let mut stages: Vec<Tensor> = vec![k1.clone()];
        for stage in 1..6 {
            let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &y)];
            for (a, k) in A[stage].iter().zip(&stages) {
                terms.push((direction * h * a, k));
            }
            let y_stage = lincomb(&terms)?;
            stages.push(f(&y_stage, s + direction * h * C[stage])?);
        }
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &y)];
        for (b, k) in B5.iter().zip(&stages) {
            terms.push((direction * h * b, k));
        }
        let y_new = lincomb(&terms)?;
        let k7 = f(&y_new, s + direction * h)?;
        stages.push(k7);
        let err_terms: Vec<(f64, &Tensor)> = E
            .iter()
            .zip(&stages)
            .map(|(e, k)| (direction * h * e, k))
            .collect();
        let err = lincomb(&err_terms)?;
        let norm = tol.error_norm(&err, &y, &y_new)?;
        if norm <= 1.0 {
            s += direction * h;
            y = y_new;
            k1 = stages.pop().expect("seven stages");
            accepted += 1;
            on_step(accepted - 1, s, &y)?;
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
            candle_core::bail!("rk45 step size underflow at s = {s}")
        }
    }
    Ok(y)
}
