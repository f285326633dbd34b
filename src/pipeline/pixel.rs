//! Pixel-space DDPM (Ho et al. 2020): the U-Net on images directly, no autoencoder, no text; an
//! optional class label. Loaded from a training checkpoint or a shipped weights file, both of
//! which carry their training config as metadata.

use super::pixel_config::{Conditioning, PixelModel};
use crate::checkpoint;
use crate::diffusion::schedule::PredictionType;
use crate::error::{Error, Result};
use crate::model::config::UNetConfig;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::UNetConditioning;
use crate::sampler::noise::SeededNoise;
use crate::sampler::SamplerKind;
use crate::sampler::{build_sampler, SamplerOptions};
use crate::sampler::{Denoiser, SchedulerConfig, StepEvent};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;

/// Metadata key of the TOML training config in weights files (training checkpoints keep it
/// under [`CHECKPOINT_CONFIG_KEY`]).
pub const CONFIG_KEY: &str = "diffuse.train_config";
/// Metadata key of the TOML training config in training checkpoints.
pub const CHECKPOINT_CONFIG_KEY: &str = "diffuse.config";

/// A trained pixel-space model.
pub struct PixelDiffusion {
    /// The network and diffusion process, as the training config described them.
    pub description: PixelModel,
    pub scheduler: SchedulerConfig,
    pub unet: UNet2DConditionModel,
    device: Device,
}

/// Which weights of a checkpoint to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsChoice {
    /// The exponential moving average when the file has one (what DDPM samples from).
    Ema,
    /// The raw optimiser weights.
    Raw,
}

/// The training config (TOML) in a checkpoint's or weights file's metadata.
pub fn training_config(
    metadata: &std::collections::BTreeMap<String, String>,
    path: &Path,
) -> Result<String> {
    metadata
        .get(CHECKPOINT_CONFIG_KEY)
        .or_else(|| metadata.get(CONFIG_KEY))
        .cloned()
        .ok_or_else(|| {
            crate::error::file_error(
                path,
                format!("has no \"{CONFIG_KEY}\" metadata entry (not a pixel model's file)"),
            )
        })
}

impl PixelDiffusion {
    /// Builds the model `description` describes from `weights` (names as the U-Net asks for
    /// them). A missing tensor or a tensor of another shape is an error that names it.
    pub fn from_tensors(
        description: PixelModel,
        weights: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let unet_config = description.unet_config()?;
        let scheduler = description.scheduler_config();
        check_names(&unet_config, &weights)?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let unet = UNet2DConditionModel::new(unet_config, vb)?;
        Ok(Self {
            description,
            scheduler,
            unet,
            device: device.clone(),
        })
    }

    /// Loads a checkpoint written by `diffuse train` or a weights file such as
    /// `weights/ddpm-mnist.safetensors`.
    pub fn load(path: &Path, choice: WeightsChoice, device: &Device) -> Result<Self> {
        let loaded = checkpoint::load(path, device)?;
        let toml = training_config(&loaded.metadata, path)?;
        let description = PixelModel::from_toml_str(&toml).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: format!("its training config is not valid: {e}"),
        })?;
        let ema = loaded.with_prefix("ema.");
        let weights = if choice == WeightsChoice::Ema && !ema.is_empty() {
            ema
        } else {
            loaded.with_prefix("model.")
        };
        if weights.is_empty() {
            return Err(Error::File {
                path: path.display().to_string(),
                message: "holds no model.* or ema.* tensors".into(),
            });
        }
        let weights = weights
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(description, weights, device).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.description.diffusion.prediction_type
    }

    pub fn image_shape(&self) -> (usize, usize, usize) {
        let m = &self.description.model;
        (m.channels, m.image_size, m.image_size)
    }

    pub fn num_classes(&self) -> Option<usize> {
        match self.description.model.conditioning {
            Conditioning::Class => self.description.model.num_classes,
            Conditioning::None => None,
        }
    }

    /// The raw network output (prediction, then the variance channels for a learned variance)
    /// at integer-or-fractional timesteps `t` (one per row).
    pub fn forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        Ok(self
            .unet
            .forward(x, t, &UNetConditioning::classes(labels.cloned()))?)
    }

    /// Draws `n` images with `sampler` in `steps` steps; `labels` (one per image) for
    /// class-conditional models. Returns (n, C, H, W) in [-1, 1].
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        kind: SamplerKind,
        options: &SamplerOptions,
        steps: usize,
        n: usize,
        labels: Option<&[u32]>,
        seed: u64,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let labels = self.check_labels(labels, n)?;
        let sampler = build_sampler(kind, &self.scheduler, options, steps)?;
        let (c, h, w) = self.image_shape();
        let mut noise = SeededNoise::new(seed);
        let device = self.unet_device();
        let x_start = noise
            .randn(&[n, c, h, w])?
            .to_device(&device)?
            .affine(sampler.init_noise_sigma(), 0.0)?;
        let mut denoiser = PixelDenoiser {
            model: self,
            labels: labels.as_ref(),
            keep_variance: kind == SamplerKind::Ddpm && self.scheduler.variance_type.is_learned(),
            prediction_type: self.prediction_type(),
        };
        let mut callback = |e: &StepEvent| {
            progress(e.index + 1, e.total);
            Ok(())
        };
        let out = sampler.sample(&mut denoiser, x_start, &mut noise, &mut callback)?;
        Ok(out.clamp(-1f32, 1f32)?)
    }

    fn unet_device(&self) -> Device {
        self.device.clone()
    }

    /// The labels as a tensor, checked against the model's classes.
    pub fn check_labels(&self, labels: Option<&[u32]>, n: usize) -> Result<Option<Tensor>> {
        match (self.num_classes(), labels) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(Error::Msg(
                "this model is unconditional: it takes no class labels".into(),
            )),
            (Some(k), None) => Err(Error::Msg(format!(
                "this model is class-conditional: give a class in 0..{k}"
            ))),
            (Some(k), Some(labels)) => {
                if labels.len() != n {
                    return Err(Error::Msg(format!(
                        "{} labels for {n} images",
                        labels.len()
                    )));
                }
                if let Some(bad) = labels.iter().find(|l| **l as usize >= k) {
                    return Err(Error::bad_value(
                        "class",
                        bad,
                        &format!("a class in 0..{k}"),
                    ));
                }
                Ok(Some(Tensor::new(labels, &self.unet_device())?))
            }
        }
    }
}

/// The variational bound of each image, in bits per dimension, and its parts (DDPM eq. 5):
/// `total = prior + kl + decoder`.
#[derive(Debug, Clone, Default)]
pub struct VlbTerms {
    pub total: Vec<f64>,
    /// L_T = KL(q(x_T | x_0) || p(x_T)).
    pub prior: Vec<f64>,
    /// sum over t = 1..T-1 of L_{t-1}, the KL terms.
    pub kl: Vec<f64>,
    /// L_0 = -log p(x_0 | x_1), the discretised decoder.
    pub decoder: Vec<f64>,
}

impl PixelDiffusion {
    /// The bound over all T timesteps for images `x0` in [-1, 1] (8-bit values), with one fresh
    /// noise draw per timestep from `seed`; `progress(t)` after each timestep. The posterior
    /// mean uses x_0 clipped to [-1, 1], as improved-diffusion evaluates.
    pub fn vlb(
        &self,
        x0: &Tensor,
        labels: Option<&Tensor>,
        seed: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<VlbTerms> {
        let schedule = self.scheduler.noise_schedule()?;
        let tables = crate::diffusion::likelihood::DiffusionTables::new(&schedule);
        let batch = x0.dim(0)?;
        let mut noise = SeededNoise::new(seed);
        let mut kl = vec![0f64; batch];
        let mut decoder = vec![0f64; batch];
        for t in 0..tables.num_timesteps() {
            let eps = noise.randn(x0.dims())?.to_device(x0.device())?;
            let timesteps = vec![t; batch];
            let xt = crate::diffusion::schedule::q_sample(&schedule, x0, &timesteps, &eps)?;
            let t_tensor = Tensor::full(t as f32, batch, x0.device())?;
            let output =
                self.unet
                    .forward(&xt, &t_tensor, &UNetConditioning::classes(labels.cloned()))?;
            let output = self.output_as_eps(&output, &xt, schedule.alphas_cumprod[t])?;
            let (mean, log_variance) = tables.p_mean_variance(
                &output,
                &xt,
                &timesteps,
                self.scheduler.variance_type,
                true,
            )?;
            let term = tables
                .vb_term_bits(x0, &xt, &timesteps, &mean, &log_variance)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let target = if t == 0 { &mut decoder } else { &mut kl };
            for (acc, v) in target.iter_mut().zip(term) {
                *acc += v;
            }
            progress(t + 1);
        }
        let prior = tables
            .prior_bits(x0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let total = (0..batch).map(|i| prior[i] + kl[i] + decoder[i]).collect();
        Ok(VlbTerms {
            total,
            prior,
            kl,
            decoder,
        })
    }

    /// The network output with the prediction converted to epsilon (variance channels kept).
    fn output_as_eps(&self, output: &Tensor, xt: &Tensor, alpha_bar: f64) -> Result<Tensor> {
        let kind = self.prediction_type();
        if kind == PredictionType::Epsilon {
            return Ok(output.clone());
        }
        let channels = xt.dim(1)?;
        let prediction = output.narrow(1, 0, channels)?;
        let eps = crate::diffusion::schedule::prediction::to_eps(
            kind,
            &prediction,
            xt,
            alpha_bar.sqrt(),
            (1.0 - alpha_bar).sqrt(),
        )?;
        if output.dim(1)? > channels {
            Ok(Tensor::cat(
                &[&eps, &output.narrow(1, channels, channels)?],
                1,
            )?)
        } else {
            Ok(eps)
        }
    }

    /// The probability-flow ODE likelihood (bits/dim) of dequantised images `x` in [-1, 1]:
    /// the VP SDE that is the continuous limit of the training schedule, integrated from
    /// t = 1e-5 (Song et al. 2021, appendix D.2) with Hutchinson probe `probe`.
    pub fn ode_nll(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        probe: &Tensor,
        tolerance: crate::ops::ode::Tolerance,
    ) -> Result<crate::diffusion::likelihood::OdeLikelihood> {
        use crate::diffusion::sde::{Sde, VpBeta, VpSde};
        let sde = VpSde {
            beta: VpBeta::Table(self.scheduler.noise_schedule()?),
            sampling_eps: 1e-5,
        };
        let kind = self.prediction_type();
        let channels = x.dim(1)?;
        let mut eps_model = |x: &Tensor, t: f64| -> candle_core::Result<Tensor> {
            let batch = x.dim(0)?;
            let timesteps = Tensor::full(sde.model_time(t) as f32, batch, x.device())?;
            let output =
                self.unet
                    .forward(x, &timesteps, &UNetConditioning::classes(labels.cloned()))?;
            let (alpha, sigma) = sde.marginal(t);
            crate::diffusion::schedule::prediction::to_eps(
                kind,
                &output.narrow(1, 0, channels)?,
                x,
                alpha,
                sigma,
            )
        };
        Ok(crate::diffusion::likelihood::ode_bits_per_dim(
            &mut eps_model,
            &sde,
            x,
            probe,
            sde.sampling_eps,
            tolerance,
        )?)
    }
}

/// Compares `weights` with the tensors the config's U-Net has, naming the first missing, extra or
/// wrongly shaped one (a checkpoint from another model shape).
fn check_names(config: &UNetConfig, weights: &HashMap<String, Tensor>) -> Result<()> {
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(config.clone(), vb)?;
    for (name, var) in crate::ops::tensor::named_vars(&varmap) {
        match weights.get(&name) {
            None => {
                return Err(Error::Msg(format!(
                    "missing tensor {name} (the config needs shape {:?})",
                    var.dims()
                )))
            }
            Some(t) if t.dims() != var.dims() => {
                return Err(Error::Msg(format!(
                    "tensor {name} has shape {:?}, the config needs {:?}",
                    t.dims(),
                    var.dims()
                )))
            }
            Some(_) => {}
        }
    }
    let known = varmap.data().lock().expect("VarMap lock");
    let mut extra: Vec<&String> = weights.keys().filter(|k| !known.contains_key(*k)).collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(Error::Msg(format!(
            "{} tensors the config does not use (first: {first}): is it for another model shape?",
            extra.len()
        )));
    }
    Ok(())
}

/// The model as the samplers see it: f(x, t), with the variance channels dropped for every
/// sampler except DDPM's ancestral one, which uses them.
pub struct PixelDenoiser<'a> {
    pub model: &'a PixelDiffusion,
    pub labels: Option<&'a Tensor>,
    pub keep_variance: bool,
    pub prediction_type: PredictionType,
}

impl Denoiser for PixelDenoiser<'_> {
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn predict(&mut self, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        let batch = x.dim(0)?;
        let t = Tensor::full(t as f32, batch, x.device())?;
        let out = self
            .model
            .unet
            .forward(x, &t, &UNetConditioning::classes(self.labels.cloned()))?
            .detach();
        if self.model.scheduler.variance_type.is_learned() && !self.keep_variance {
            out.narrow(1, 0, x.dim(1)?)
        } else {
            Ok(out)
        }
    }
}

/// A grid of `images` given class-major (all images of the first class, then the next, the same
/// number each), one class a column.
pub fn class_columns_grid(images: &Tensor, classes: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    let per_class = n / classes.max(1);
    let by_row = images
        .narrow(0, 0, per_class * classes)?
        .reshape((classes, per_class, c, h, w))?
        .transpose(0, 1)?
        .reshape((per_class * classes, c, h, w))?;
    grid(&by_row, classes)
}

/// Tiles (n, C, H, W) images in [-1, 1] into one (C, rows H, cols W) image in [0, 1], `cols`
/// across, with 2-pixel gaps.
pub fn grid(images: &Tensor, cols: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    let cols = cols.max(1).min(n.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (gh, gw) = (rows * (h + gap) - gap, cols * (w + gap) - gap);
    let values = images
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0.0f32; c * gh * gw];
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[ch * gh * gw + (r * (h + gap) + y) * gw + col * (w + gap) + x] =
                        values[((i * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (c, gh, gw), &Device::Cpu)?)
}
