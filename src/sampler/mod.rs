//! Samplers: every reverse-process solver of the papers behind one trait.
//!
//! A sampler sees the network only as a [`Denoiser`], a function `f(x, t) -> prediction` plus the
//! kind of prediction it makes. It knows the timesteps and noise levels it will visit; it draws
//! randomness from a [`NoiseSource`] so that runs are reproducible (and so that the diffusers
//! fixtures, which record every noise tensor, can be replayed).

pub mod build;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod heun;
pub mod lms;
pub mod noise;
pub mod pc;
pub mod pndm;
pub mod registry;
pub mod rk45;
pub mod unipc;

use candle_core::{Result, Tensor};

pub use crate::diffusion::schedule::PredictionType;
pub use build::{build_sampler, SamplerOptions};
pub use config::SchedulerConfig;
pub use noise::{NoiseSource, ReplayNoise, SeededNoise};
pub use registry::SamplerKind;

/// The network as a sampler sees it: `f(x, t)` where `x` is the model input (already scaled by
/// the sampler where it scales inputs) and `t` is the time label the network was trained with.
/// Samplers never differentiate: an implementation over trainable weights should return a
/// detached tensor, or the sampling chain keeps every step's activations alive.
pub trait Denoiser {
    fn prediction_type(&self) -> PredictionType;
    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor>;

    /// A constraint on the sample after update `index` (inpainting with an ordinary model puts
    /// the known region back); the samplers that can start from an image apply it. Identity by
    /// default.
    fn after_step(&mut self, _index: usize, sample: Tensor) -> Result<Tensor> {
        Ok(sample)
    }
}

/// A [`Denoiser`] from a closure.
pub struct FnDenoiser<F> {
    pub prediction_type: PredictionType,
    pub f: F,
}

impl<F: FnMut(&Tensor, f64) -> Result<Tensor>> Denoiser for FnDenoiser<F> {
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
    fn predict(&mut self, x: &Tensor, t: f64) -> Result<Tensor> {
        (self.f)(x, t)
    }
}

/// What a sampler reports after each update of the sample.
pub struct StepEvent<'a> {
    /// 0-based index of the update.
    pub index: usize,
    /// Number of updates planned (adaptive solvers report their count so far).
    pub total: usize,
    /// The time label of the model call that led to this update.
    pub t: f64,
    pub sample: &'a Tensor,
    /// The sampler's estimate of x_0 at this update, where it forms one.
    pub pred_original: Option<&'a Tensor>,
}

/// Per-update callback: progress bars, trajectory recording, NaN checks.
pub type Callback<'a> = dyn FnMut(&StepEvent) -> Result<()> + 'a;

/// A reverse-process solver, configured for a number of steps.
pub trait Sampler {
    /// A short name, as on the command line.
    fn name(&self) -> &'static str;

    /// Standard deviation of the starting noise x_T.
    fn init_noise_sigma(&self) -> f64;

    /// The time labels the model will be called with, in order (for an adaptive solver: the
    /// interval's end points only).
    fn timesteps(&self) -> Vec<f64>;

    /// Runs the reverse process from `x_start`, which must already be scaled by
    /// [`Sampler::init_noise_sigma`].
    fn sample(
        &self,
        model: &mut dyn Denoiser,
        x_start: Tensor,
        noise: &mut dyn NoiseSource,
        callback: &mut Callback,
    ) -> Result<Tensor>;

    /// The VE noise level at each entry of [`Sampler::timesteps`] plus the final one, for the
    /// samplers that walk a sigma grid.
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }

    /// Noises clean `x0` to the first timestep this sampler visits, q(x_t | x_0) (DDPM eq. 4, or
    /// x_0 + sigma eps in VE form): the start of image-to-image runs (SDEdit, Meng et al. 2022).
    fn add_noise(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(x0, noise, 0)
    }

    /// [`Sampler::add_noise`] to the noise level of visited timestep `index`, in the form of
    /// this sampler's samples.
    fn add_noise_at(&self, _x0: &Tensor, _noise: &Tensor, _index: usize) -> Result<Tensor> {
        candle_core::bail!("the {} sampler cannot start from an image", self.name())
    }

    /// Whether `sample` applies [`Denoiser::after_step`] after every update.
    fn applies_after_step(&self) -> bool {
        false
    }

    /// Model evaluations used by the last call to `sample`, for solvers that adapt their steps.
    fn last_evaluations(&self) -> Option<usize> {
        None
    }
}

/// q(x_t | x_0) of DDPM (Ho et al. 2020, eq. 4) at `timesteps[index]`: sqrt(alpha_bar) x_0 +
/// sqrt(1 - alpha_bar) eps, for the samplers that walk discrete timesteps of VP samples.
pub(crate) fn add_noise_at_timestep(
    alphas_cumprod: &[f64],
    timesteps: &[usize],
    x0: &Tensor,
    noise: &Tensor,
    index: usize,
) -> Result<Tensor> {
    let Some(alpha_bar) = timesteps.get(index).and_then(|t| alphas_cumprod.get(*t)) else {
        candle_core::bail!("timestep {index} asked of a run of {}", timesteps.len())
    };
    crate::ops::tensor::lincomb(&[(alpha_bar.sqrt(), x0), ((1.0 - alpha_bar).sqrt(), noise)])
}

/// Clipping or dynamic thresholding of predicted x_0 (DDPM's `clip_sample`; Saharia et al. 2022,
/// section 2.3 for dynamic thresholding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Clip {
    None,
    Clip { range: f64 },
    Threshold { ratio: f64, max_value: f64 },
}

impl X0Clip {
    pub fn apply(&self, x0: Tensor) -> Result<Tensor> {
        match *self {
            X0Clip::None => Ok(x0),
            X0Clip::Clip { range } => x0.clamp(-range, range),
            X0Clip::Threshold { ratio, max_value } => dynamic_threshold(&x0, ratio, max_value),
        }
    }
}

/// Per sample: s = the `ratio` quantile of |x_0|, clamped to [1, max_value]; x_0 <- clamp(x_0, -s, s) / s.
fn dynamic_threshold(x0: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let shape = x0.shape().clone();
    let dtype = x0.dtype();
    let rows: Vec<Vec<f32>> = x0
        .flatten_from(1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()?;
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.len()).sum());
    for row in rows {
        let mut abs: Vec<f64> = row.iter().map(|v| v.abs() as f64).collect();
        abs.sort_by(|a, b| a.total_cmp(b));
        // Linear interpolation between order statistics, as torch.quantile.
        let pos = ratio * (abs.len() - 1) as f64;
        let low = pos.floor() as usize;
        let high = (low + 1).min(abs.len() - 1);
        let q = abs[low] + (pos - low as f64) * (abs[high] - abs[low]);
        let s = q.clamp(1.0, max_value);
        out.extend(row.iter().map(|v| ((*v as f64).clamp(-s, s) / s) as f32));
    }
    Tensor::from_vec(out, shape, x0.device())?.to_dtype(dtype)
}
