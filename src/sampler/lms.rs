//! The linear multistep method (k-diffusion's `sample_lms`, after Karras et al. 2022 section 3):
//! the last `order` ODE slopes are extrapolated by their Lagrange polynomial in sigma and the
//! polynomial is integrated exactly over [sigma_i, sigma_{i+1}].

use super::euler::{denoise, ode_slope, SigmaGrid};
use super::{Callback, Denoiser, NoiseSource, Sampler, StepEvent};
use crate::ops::tensor::lincomb;
use candle_core::{Result, Tensor};

pub struct Lms {
    pub grid: SigmaGrid,
    pub order: usize,
}

/// Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node
/// sigmas[i - j] on the nodes sigmas[i], ..., sigmas[i - order + 1]. The integrand has degree
/// order - 1, so 4-point Gauss-Legendre quadrature is exact for order <= 8.
fn lms_coefficient(sigmas: &[f64], order: usize, i: usize, j: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|k| *k != j)
            .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
            .product::<f64>()
    };
    const NODES: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const WEIGHTS: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let half = 0.5 * (b - a);
    let mid = 0.5 * (a + b);
    NODES
        .iter()
        .zip(WEIGHTS)
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

impl Sampler for Lms {
    fn name(&self) -> &'static str {
        super::SamplerKind::Lms.cli_name()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma
    }

    fn timesteps(&self) -> Vec<f64> {
        self.grid.timesteps.clone()
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.grid.sigmas.clone())
    }

    fn add_noise_at(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.grid.add_noise_ve(x0, noise, index)
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
        let mut slopes: Vec<Tensor> = Vec::new();
        for (i, &t) in self.grid.timesteps.iter().enumerate() {
            let x0 = denoise(model, &x, sigmas[i], t)?;
            slopes.push(ode_slope(&x, &x0, sigmas[i])?);
            if slopes.len() > self.order {
                slopes.remove(0);
            }
            let order = (i + 1).min(self.order);
            let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &x)];
            // slopes are oldest first; coefficient j belongs to the slope j steps back.
            for j in 0..order {
                terms.push((
                    lms_coefficient(sigmas, order, i, j),
                    &slopes[slopes.len() - 1 - j],
                ));
            }
            let next = lincomb(&terms)?;
            x = model.after_step(i, next)?;
            callback(&StepEvent {
                index: i,
                total: self.grid.steps(),
                t,
                sample: &x,
                pred_original: Some(&x0),
            })?;
        }
        Ok(x)
    }
}
