//! Training: one session loop and one trainer state (optimiser, weight average, checkpoint
//! layout) under four trainers that differ in their data, loss and outputs: pixel-space DDPM,
//! latent text-to-image, the autoencoder, and fine-tuning a Stable Diffusion U-Net.

pub mod config;
pub mod discriminator;
pub mod finetune;
pub mod finetune_data;
pub mod judge;
pub mod latent_data;
pub mod ldm;
pub mod optim;
pub mod pixel;
pub mod plot;
pub mod session;
pub mod state;
pub mod unet_trainer;
pub mod vae;

use crate::diffusion::schedule::{
    min_snr_weights, q_sample, training_target, NoiseSchedule, PredictionType,
};
pub use crate::ops::tensor::named_vars;
use crate::sampler::noise::SeededNoise;
use candle_core::{Tensor, Var};
use rand::Rng;

/// The RNG seed of step `step` (0-based) of a run seeded `seed`: every draw of a step comes from
/// it, so a resumed run takes the steps an uninterrupted one would have taken.
pub fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The draws that open step `step` (0-based) of a run seeded `seed`: the step's RNG, then
/// `batch` examples and timesteps, uniform over the data and over the `timesteps` training
/// timesteps (DDPM algorithm 1, lines 2-3), drawn in this order (the resume tests hold every
/// trainer to it). The rest of the step's draws come from the returned RNG.
pub fn draw_examples_and_timesteps(
    seed: u64,
    step: usize,
    batch: usize,
    examples: usize,
    timesteps: usize,
) -> (SeededNoise, Vec<usize>, Vec<usize>) {
    let mut rng = SeededNoise::new(step_seed(seed, step));
    let indices = (0..batch)
        .map(|_| rng.rng().random_range(0..examples))
        .collect();
    let drawn = (0..batch)
        .map(|_| rng.rng().random_range(0..timesteps))
        .collect();
    (rng, indices, drawn)
}

/// A batch of clean examples noised to their timesteps: x_t = sqrt(abar_t) x_0 +
/// sqrt(1 - abar_t) eps (DDPM eq. 4), the timesteps as the U-Net takes them, and what the network
/// regresses to under `prediction` (eps in DDPM eq. 14, v or x_0 otherwise).
pub struct NoisedBatch {
    pub xt: Tensor,
    /// The timesteps as an (N,) f32 tensor on the examples' device.
    pub t: Tensor,
    pub target: Tensor,
}

impl NoisedBatch {
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: PredictionType,
        x0: &Tensor,
        timesteps: &[usize],
        eps: &Tensor,
    ) -> crate::Result<Self> {
        let xt = q_sample(schedule, x0, timesteps, eps)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            timesteps.len(),
            x0.device(),
        )?;
        let target = training_target(schedule, prediction, x0, eps, timesteps)?;
        Ok(Self { xt, t, target })
    }
}

/// Re-initialises every variable from a seeded RNG (candle's initialisers draw from an unseeded
/// one): weights uniform in +-1/sqrt(fan_in) (PyTorch's default for linear and conv layers),
/// biases zero, normalisation scales one, and the layers named in `zero_init` zero, as
/// improved-diffusion does for each residual branch's last conv and the output conv so that every
/// block starts as the identity.
pub fn seeded_init(
    named: &[(String, Var)],
    rng: &mut SeededNoise,
    zero_init: &dyn Fn(&str) -> bool,
) -> candle_core::Result<()> {
    for (name, var) in named {
        let fan_in = (var.elem_count() / var.dims().first().copied().unwrap_or(1).max(1)).max(1);
        let bound = if var.rank() == 1 {
            0.0
        } else {
            (1.0 / fan_in as f64).sqrt()
        };
        // Every variable draws, whatever its rule, so adding a rule never shifts the others.
        let mut values: Vec<f32> = (0..var.elem_count())
            .map(|_| ((rng.rng().random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let is_norm_scale = var.rank() == 1 && name.ends_with("weight");
        if is_norm_scale {
            values.fill(1.0);
        } else if zero_init(name) {
            values.fill(0.0);
        }
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// The mean over the batch of each example's mean squared error, each weighted by `weights`
/// where given: L_simple (DDPM eq. 14) or its min-SNR-gamma weighting (Hang et al. 2023).
pub fn weighted_mse(
    prediction: &Tensor,
    target: &Tensor,
    weights: Option<&[f64]>,
) -> crate::Result<Tensor> {
    let per_example = (prediction - target)?.sqr()?.flatten_from(1)?.mean(1)?;
    Ok(match weights {
        None => per_example.mean_all()?,
        Some(weights) => {
            let weights = Tensor::from_vec(
                weights.iter().map(|w| *w as f32).collect::<Vec<_>>(),
                weights.len(),
                prediction.device(),
            )?;
            (per_example * weights)?.mean_all()?
        }
    })
}

/// L_simple over a batch noised at `timesteps`, or its min-SNR weighting (Hang et al. 2023)
/// when `min_snr_gamma` is set.
pub fn denoising_loss(
    prediction: &Tensor,
    target: &Tensor,
    (schedule, prediction_type): (&NoiseSchedule, PredictionType),
    timesteps: &[usize],
    min_snr_gamma: Option<f64>,
) -> crate::Result<Tensor> {
    let weights =
        min_snr_gamma.map(|gamma| min_snr_weights(schedule, prediction_type, gamma, timesteps));
    weighted_mse(prediction, target, weights.as_deref())
}

/// The loss's value and its gradients, or an error naming step `step` (0-based) when the loss
/// is not finite.
pub fn checked_loss_backward(
    loss: &Tensor,
    step: usize,
) -> crate::Result<(f64, candle_core::backprop::GradStore)> {
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Err(crate::Error::Msg(format!(
            "the loss became {value} at step {}; stopping without saving, so the last checkpoint stays the last good one",
            step + 1
        )));
    }
    Ok((value, loss.backward()?))
}

/// The global gradient norm, or an error naming step `step` (0-based) when it is not finite.
pub fn checked_grad_norm(
    vars: &[Var],
    grads: &candle_core::backprop::GradStore,
    step: usize,
) -> crate::Result<f64> {
    let norm = optim::grad_norm(vars, grads)?;
    if !norm.is_finite() {
        return Err(crate::Error::Msg(format!(
            "the gradient norm became {norm} at step {}; stopping without saving",
            step + 1
        )));
    }
    Ok(norm)
}

/// Exponential moving average of the weights (DDPM appendix B), with the warm-up
/// decay_k = min(decay, (1 + k)/(10 + k)) so that the average is useful early in short runs.
#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    pub average: Vec<Tensor>,
}

impl Ema {
    /// Starts at the current weights: copies, since a variable's storage is updated in place
    /// and a detached view of it would follow the training; detached, since a copy of a
    /// variable is part of its graph, and so would every average after it be (the graph would
    /// grow each step, and a model built from the average would take the training paths).
    pub fn new(decay: f64, vars: &[(String, Var)]) -> candle_core::Result<Self> {
        Ok(Self {
            decay,
            average: vars
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().copy()?.detach()))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Folds in the weights after optimiser step `step` (0-based).
    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> candle_core::Result<()> {
        let k = step as f64;
        let decay = self.decay.min((1.0 + k) / (10.0 + k));
        for (average, (_, var)) in self.average.iter_mut().zip(vars) {
            let weights = var.as_tensor().detach();
            *average = match Self::fused_blend(average, &weights, decay)? {
                Some(blended) => blended,
                None => (average.affine(decay, 0.0)? + weights.affine(1.0 - decay, 0.0)?)?,
            };
        }
        Ok(())
    }

    /// decay average + (1 - decay) weights in one pass over f32 CPU tensors (composed, three
    /// passes and three fresh tensors); `None` for other devices and dtypes.
    fn fused_blend(
        average: &Tensor,
        weights: &Tensor,
        decay: f64,
    ) -> candle_core::Result<Option<Tensor>> {
        use crate::ops::tensor::{is_cpu_f32, storage_f32};
        if !(is_cpu_f32(average) && is_cpu_f32(weights)) || average.shape() != weights.shape() {
            return Ok(None);
        }
        let (average, weights) = (average.contiguous()?, weights.contiguous()?);
        let blended = {
            let (a_storage, a_layout) = average.storage_and_layout();
            let (w_storage, w_layout) = weights.storage_and_layout();
            let a = storage_f32(&a_storage, a_layout, "ema", "the average")?;
            let w = storage_f32(&w_storage, w_layout, "ema", "the weights")?;
            let (keep, take) = (decay as f32, (1.0 - decay) as f32);
            crate::ops::vector_math::with_wide_vectors(
                #[inline(always)]
                || {
                    a.iter()
                        .zip(w)
                        .map(|(a, w)| keep * a + take * w)
                        .collect::<Vec<f32>>()
                },
            )
        };
        Ok(Some(Tensor::from_vec(
            blended,
            average.shape(),
            average.device(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Each example's mean squared error counts with its own weight; without weights, the
    /// plain mean over every element.
    #[test]
    fn weighted_mse_weights_each_example() {
        let device = Device::Cpu;
        let prediction = Tensor::new(&[[1f32, 3.0], [0.0, 0.0]], &device).unwrap();
        let target = Tensor::new(&[[0f32, 0.0], [2.0, 4.0]], &device).unwrap();
        let scalar = |loss: Tensor| loss.to_scalar::<f32>().unwrap();
        // Per example: (1 + 9) / 2 = 5 and (4 + 16) / 2 = 10.
        let plain = scalar(weighted_mse(&prediction, &target, None).unwrap());
        assert_eq!(plain, 7.5);
        let weighted = scalar(weighted_mse(&prediction, &target, Some(&[1.0, 0.25])).unwrap());
        assert_eq!(weighted, (5.0 + 2.5) / 2.0);
    }

    /// The fused blend (f32 CPU weights) equals the composed one (f64 weights) over a few updates
    /// through the warm-up decay, and the average holds no graph.
    #[test]
    fn fused_average_matches_the_composed_one() {
        let start = crate::ops::tensor::seeded_randn(&[3, 37], 7);
        let run = |dtype: DType| {
            let var = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
            let named = vec![("w".to_string(), var.clone())];
            let mut ema = Ema::new(0.99, &named).unwrap();
            for step in 0..4 {
                let next = var.as_tensor().affine(0.5, step as f64 + 1.0).unwrap();
                var.set(&next).unwrap();
                ema.update(&named, step).unwrap();
            }
            assert!(!ema.average[0].track_op());
            ema.average[0]
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (fused, composed) = (run(DType::F32), run(DType::F64));
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} against {b}");
        }
    }
}
