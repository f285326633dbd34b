//! Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1
//! and appendix G) on small gray images: the reconstruction loss plus a small KL term that keeps
//! the latent posterior near N(0, I). The perceptual and adversarial terms of the paper are left
//! out; at 28x28 a pixel loss reconstructs digits and clothes well.
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k), so a resumed run takes the
//! steps an uninterrupted one would have taken.

use super::discriminator::{discriminator_hinge_loss, generator_hinge_loss, PatchDiscriminator};
use super::optim::AdamWParams;
use super::state::{TrainerKind, TrainerState, UpdateRule};
use super::{named_vars, seeded_init};
use crate::checkpoint;
use crate::data::idx::{LabelledImages, Split};
use crate::error::{Error, Result};
use crate::model::config::VaeConfig;
use crate::model::vae::AutoencoderKL;
use crate::sampler::noise::SeededNoise;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `diffuse train-vae`'s TOML config. Unknown keys are errors that name the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaeTrainConfig {
    pub data: VaeDataConfig,
    pub model: VaeModelConfig,
    pub train: VaeOptimConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaeDataConfig {
    /// MNIST-layout IDX folders whose training images are pooled (same image size each).
    pub paths: Vec<PathBuf>,
    /// Images are padded with black to this square size (a multiple of the downsampling).
    pub image_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaeModelConfig {
    #[serde(default = "grey_channels")]
    pub channels: usize,
    /// One entry a level; each level after the first halves the size.
    pub block_out_channels: Vec<usize>,
    #[serde(default = "vae_layers_per_block_default")]
    pub layers_per_block: usize,
    #[serde(default = "latent_channels_default")]
    pub latent_channels: usize,
    #[serde(default = "norm_groups_default")]
    pub norm_num_groups: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaeOptimConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    /// Weight of the KL term against the per-pixel L1 loss, both per image (LDM's 1e-6).
    #[serde(default = "kl_weight")]
    pub kl_weight: f64,
    #[serde(default)]
    pub seed: u64,
    /// A diffusers `vae/` folder whose weights start the run (instead of a seeded draw).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// false: only the decoder (and `post_quant_conv`) learns. The latent space then stays the
    /// one a diffusion model was trained on, so a sharper decoder drops in under it (Stable
    /// Diffusion's ft-MSE decoders were made this way).
    #[serde(default = "train_encoder_default")]
    pub train_encoder: bool,
    /// Weight of the adversarial term (the decoder's hinge loss against a patch discriminator,
    /// LDM appendix G) beside the per-pixel L1; 0 trains no discriminator.
    #[serde(default)]
    pub adversarial_weight: f64,
    /// The step from which the decoder sees the adversarial term; the discriminator learns from
    /// the first step, so it is not random when its verdicts start to count (LDM's disc_start).
    #[serde(default)]
    pub adversarial_start: usize,
    /// Channels of the discriminator's first layer (twice as many in its second).
    #[serde(default = "discriminator_channels")]
    pub discriminator_channels: usize,
    pub out_dir: PathBuf,
    #[serde(default = "every_500")]
    pub checkpoint_every: usize,
    #[serde(default = "every_50")]
    pub log_every: usize,
}

fn discriminator_channels() -> usize {
    32
}
fn norm_groups_default() -> usize {
    8
}
fn grad_clip() -> f64 {
    1.0
}
fn kl_weight() -> f64 {
    1e-6
}
fn every_500() -> usize {
    500
}
fn every_50() -> usize {
    50
}

impl VaeTrainConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = super::config::parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path`, its relative paths (data, init, output) taken from its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut config = super::config::read_config(path, Self::from_toml_str)?;
        let base = super::config::config_dir(path);
        for data in &mut config.data.paths {
            super::config::relative_to(base, data);
        }
        if let Some(init) = &mut config.train.init {
            super::config::relative_to(base, init);
        }
        super::config::relative_to(base, &mut config.train.out_dir);
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a VaeTrainConfig always serialises")
    }

    /// How the autoencoder's (and the discriminator's) gradients become updates.
    pub fn update_rule(&self) -> UpdateRule {
        UpdateRule {
            learning_rate: self.train.learning_rate,
            warmup_steps: self.train.warmup_steps,
            grad_clip: self.train.grad_clip,
            adamw: AdamWParams::default(),
        }
    }

    /// The downsampling factor: 2 per level after the first.
    pub fn downsampling(&self) -> usize {
        1 << self.model.block_out_channels.len().saturating_sub(1)
    }

    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if m.block_out_channels.is_empty() {
            return Err(Error::bad_value(
                "model.block_out_channels",
                "[]",
                "at least one level",
            ));
        }
        if let Some(c) = m
            .block_out_channels
            .iter()
            .find(|c| m.norm_num_groups == 0 || **c % m.norm_num_groups != 0)
        {
            return Err(Error::Contradiction(format!(
                "model.block_out_channels has {c}, not a multiple of model.norm_num_groups = {}",
                m.norm_num_groups
            )));
        }
        let size = self.data.image_size;
        if size == 0 || !size.is_multiple_of(self.downsampling()) {
            return Err(Error::Contradiction(format!(
                "data.image_size = {size} is not a positive multiple of the downsampling {} (2 per level of model.block_out_channels after the first)",
                self.downsampling()
            )));
        }
        if self.data.paths.is_empty() {
            return Err(Error::bad_value("data.paths", "[]", "at least one folder"));
        }
        let t = &self.train;
        if t.steps == 0 || t.batch_size == 0 {
            return Err(Error::bad_value(
                "train.steps and train.batch_size",
                0,
                "at least 1",
            ));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(Error::bad_value(
                "train.learning_rate",
                t.learning_rate,
                "a positive number",
            ));
        }
        if !t.train_encoder && t.init.is_none() {
            return Err(Error::Contradiction(
                "train.train_encoder = false needs train.init (the VAE whose encoder is kept)"
                    .into(),
            ));
        }
        if !(t.adversarial_weight >= 0.0 && t.adversarial_weight.is_finite()) {
            return Err(Error::bad_value(
                "train.adversarial_weight",
                t.adversarial_weight,
                "0 or a positive number",
            ));
        }
        if t.adversarial_weight > 0.0
            && (t.discriminator_channels == 0
                || !(2 * t.discriminator_channels).is_multiple_of(m.norm_num_groups))
        {
            return Err(Error::Contradiction(format!(
                "train.discriminator_channels = {} doubled is not a positive multiple of model.norm_num_groups = {}",
                t.discriminator_channels, m.norm_num_groups
            )));
        }
        if !(t.kl_weight >= 0.0 && t.kl_weight.is_finite()) {
            return Err(Error::bad_value(
                "train.kl_weight",
                t.kl_weight,
                "0 or a positive number",
            ));
        }
        Ok(())
    }

    /// The diffusers `vae/config.json` of this model, with `scaling_factor`.
    pub fn diffusers_config(&self, scaling_factor: f64) -> serde_json::Value {
        let m = &self.model;
        let levels = m.block_out_channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "in_channels": m.channels,
            "out_channels": m.channels,
            "latent_channels": m.latent_channels,
            "block_out_channels": m.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "layers_per_block": m.layers_per_block,
            "norm_num_groups": m.norm_num_groups,
            "act_fn": "silu",
            "sample_size": self.data.image_size,
            "scaling_factor": scaling_factor,
        })
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        serde_json::from_value(self.diffusers_config(1.0))
            .map_err(|e| Error::Msg(format!("the VAE config: {e}")))
    }
}

/// Whether a weight belongs to the decoder side (what a decoder-only fine-tune trains).
fn is_decoder_weight(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// Sets every weight from a diffusers `vae/` folder; a missing tensor or another shape is named.
fn load_init(named: &[(String, Var)], dir: &Path, device: &Device) -> Result<()> {
    let path = crate::pipeline::weights_file(dir, "diffusion_pytorch_model")?;
    let loaded = checkpoint::load(&path, device)?;
    for (name, var) in named {
        var.set(
            &loaded
                .tensor_like(&path, name, var.dims())?
                .to_dtype(DType::F32)?,
        )?;
    }
    Ok(())
}

/// The training images of every folder, pooled; all must share one size.
pub fn load_pooled(paths: &[PathBuf], split: Split) -> Result<LabelledImages> {
    let mut pooled: Option<LabelledImages> = None;
    for path in paths {
        let part = LabelledImages::load(path, split)?;
        pooled = Some(match pooled {
            None => part,
            Some(mut all) => {
                if (all.height, all.width) != (part.height, part.width) {
                    return Err(Error::File {
                        path: path.display().to_string(),
                        message: format!(
                            "images are {}x{}, but the folders before have {}x{}",
                            part.height, part.width, all.height, all.width
                        ),
                    });
                }
                all.pixels.extend_from_slice(&part.pixels);
                all.labels.extend_from_slice(&part.labels);
                all
            }
        });
    }
    pooled.ok_or_else(|| Error::bad_value("data.paths", "[]", "at least one folder"))
}

/// (B, C, h, w) images in [-1, 1] padded with black (-1) to `size` x `size`, centred.
pub fn pad_to(images: &Tensor, size: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    if h > size || w > size {
        return Err(Error::Msg(format!(
            "images are {h}x{w}, larger than data.image_size = {size}"
        )));
    }
    let (top, left) = ((size - h) / 2, (size - w) / 2);
    let shifted = (images + 1.0)?
        .pad_with_zeros(2, top, size - h - top)?
        .pad_with_zeros(3, left, size - w - left)?;
    Ok((shifted - 1.0)?)
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct VaeStepStats {
    pub loss: f64,
    /// Mean absolute error per pixel.
    pub reconstruction: f64,
    /// KL(q(z|x) || N(0, I)) per image, in nats.
    pub kl: f64,
    /// The decoder's hinge loss -E[D(x_hat)] (0 without a discriminator).
    pub adversarial: f64,
    /// The discriminator's hinge loss (0 without one; 2 is chance, 0 a perfect critic).
    pub discriminator: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

pub struct VaeTrainer {
    pub config: VaeTrainConfig,
    vae: AutoencoderKL,
    _varmap: VarMap,
    /// Every weight, by name (what checkpoints and the diffusers folder hold).
    named: Vec<(String, Var)>,
    /// The weights that learn (all, or the decoder's), their optimiser and the step.
    state: TrainerState,
    adversary: Option<Adversary>,
    device: Device,
}

/// The patch discriminator with its weights and optimiser.
struct Adversary {
    net: PatchDiscriminator,
    _varmap: VarMap,
    state: TrainerState,
}

/// Checkpoint prefix of the discriminator's weights.
const DISCRIMINATOR_PREFIX: &str = "discriminator.";
/// Mixed into the seed of the discriminator's initial weights.
const DISCRIMINATOR_SEED_SALT: u64 = 0xD15C_0000_0000_0001;

impl Adversary {
    fn new(config: &VaeTrainConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let net = PatchDiscriminator::new(
            config.model.channels,
            config.train.discriminator_channels,
            config.model.norm_num_groups,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let named = named_vars(&varmap);
        // Its own stream, so adding a discriminator leaves the autoencoder's start unchanged.
        let seed = config.train.seed ^ DISCRIMINATOR_SEED_SALT;
        seeded_init(&named, &mut SeededNoise::new(seed), &|_| false)?;
        Ok(Self {
            net,
            _varmap: varmap,
            state: TrainerState::new(named, config.update_rule(), None)?
                .with_prefix(DISCRIMINATOR_PREFIX),
        })
    }
}

impl VaeTrainer {
    pub fn new(config: VaeTrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let vae = AutoencoderKL::new(
            config.vae_config()?,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let named = named_vars(&varmap);
        seeded_init(&named, &mut SeededNoise::new(config.train.seed), &|_| false)?;
        if let Some(dir) = &config.train.init {
            load_init(&named, dir, device)?;
        }
        let trainable: Vec<(String, Var)> = named
            .iter()
            .filter(|(name, _)| config.train.train_encoder || is_decoder_weight(name))
            .cloned()
            .collect();
        let state = TrainerState::new(trainable, config.update_rule(), None)?;
        let adversary = if config.train.adversarial_weight > 0.0 {
            Some(Adversary::new(&config, device)?)
        } else {
            None
        };
        Ok(Self {
            config,
            vae,
            _varmap: varmap,
            named,
            state,
            adversary,
            device: device.clone(),
        })
    }

    /// Completed optimiser steps.
    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn parameter_count(&self) -> usize {
        self.state.parameter_count()
    }

    /// The images at `indices`, padded, on the trainer's device.
    fn images(&self, data: &LabelledImages, indices: &[usize]) -> Result<Tensor> {
        pad_to(
            &data.batch(indices, &Device::Cpu)?,
            self.config.data.image_size,
        )?
        .to_device(&self.device)
        .map_err(Into::into)
    }

    /// The reconstruction from a posterior draw, its mean per-pixel L1, and the KL per image.
    fn losses(&self, x: &Tensor, noise: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let posterior = self.vae.encode(x)?;
        let mut z = posterior.sample(noise)?;
        if !self.config.train.train_encoder {
            // A frozen encoder: no backward pass through it.
            z = z.detach();
        }
        let decoded = self.vae.decode(&z)?;
        let reconstruction = (&decoded - x)?.abs()?.mean_all()?;
        // KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per latent value.
        let kl_values =
            ((posterior.mean.sqr()? + posterior.logvar.exp()?)? - 1.0 - &posterior.logvar)?
                .affine(0.5, 0.0)?;
        let batch = x.dim(0)?;
        let kl = (kl_values.sum_all()? / batch as f64)?;
        Ok((decoded, reconstruction, kl))
    }

    /// One optimiser step on a batch drawn from `data`: loss = L1 + kl_weight KL / pixels (the
    /// paper's sum-per-image losses divided by the pixel count) + adversarial_weight times the
    /// decoder's hinge loss once past `adversarial_start`; then one discriminator step on the same
    /// images and their reconstructions.
    pub fn train_step(&mut self, data: &LabelledImages) -> Result<VaeStepStats> {
        let t = &self.config.train;
        let step = self.state.step;
        let mut rng = SeededNoise::new(super::step_seed(t.seed, step));
        let indices: Vec<usize> = (0..t.batch_size)
            .map(|_| rng.rng().random_range(0..data.len()))
            .collect();
        let x = self.images(data, &indices)?;
        let size = self.config.data.image_size;
        let latent = size / self.config.downsampling();
        let noise = rng
            .randn(&[
                t.batch_size,
                self.config.model.latent_channels,
                latent,
                latent,
            ])?
            .to_device(&self.device)?;
        let (decoded, reconstruction, kl) = self.losses(&x, &noise)?;
        let pixels = (self.config.model.channels * size * size) as f64;
        let mut loss = (&reconstruction + kl.affine(t.kl_weight / pixels, 0.0)?)?;
        let mut adversarial = 0.0;
        if let Some(adversary) = &self.adversary {
            if step >= t.adversarial_start {
                let term = generator_hinge_loss(&adversary.net.forward(&decoded)?)?;
                adversarial = term.to_scalar::<f32>()? as f64;
                loss = (loss + term.affine(t.adversarial_weight, 0.0)?)?;
            }
        }
        let (value, grads) = super::checked_loss_backward(&loss, step)?;
        let applied = self.state.apply(&grads)?;
        let mut discriminator = 0.0;
        if let Some(adversary) = &mut self.adversary {
            let d_loss = discriminator_hinge_loss(
                &adversary.net.forward(&x)?,
                &adversary.net.forward(&decoded.detach())?,
            )?;
            let (d_value, d_grads) = super::checked_loss_backward(&d_loss, step)?;
            adversary.state.apply(&d_grads)?;
            discriminator = d_value;
        }
        Ok(VaeStepStats {
            loss: value,
            reconstruction: reconstruction.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            adversarial,
            discriminator,
            grad_norm: applied.grad_norm,
            learning_rate: applied.learning_rate,
        })
    }

    /// Reconstructions of `images` (B, C, H, W in [-1, 1], padded) from the posterior means.
    pub fn reconstruct(&self, images: &Tensor) -> Result<Tensor> {
        let posterior = self.vae.encode(&images.detach())?;
        Ok(self.vae.decode(&posterior.mean)?.detach())
    }

    /// Mean per-pixel L1 and PSNR (dB, images in [-1, 1] taken as [0, 1]) of the reconstructions
    /// of the first `n` images of `data`.
    pub fn evaluate(&self, data: &LabelledImages, n: usize) -> Result<(f64, f64)> {
        let n = n.min(data.len());
        let (mut l1, mut squared) = (0.0, 0.0);
        for start in (0..n).step_by(100) {
            let indices: Vec<usize> = (start..n.min(start + 100)).collect();
            let x = self.images(data, &indices)?;
            let error = (self.reconstruct(&x)?.clamp(-1f32, 1f32)? - &x)?;
            let count = indices.len() as f64;
            l1 += error.abs()?.mean_all()?.to_scalar::<f32>()? as f64 * count;
            squared += error.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 * count;
        }
        let (l1, mse) = (l1 / n as f64, squared / n as f64);
        // On [0, 1] the squared error is a quarter of that on [-1, 1].
        Ok((l1, 10.0 * (1.0 / (mse / 4.0)).log10()))
    }

    /// 1 / standard deviation of the posterior means of up to 1000 images: the factor that gives
    /// the diffusion model latents of unit variance (LDM section 4.3.2).
    pub fn scaling_factor(&self, data: &LabelledImages) -> Result<f64> {
        let n = data.len().min(1000);
        let mut means = Vec::new();
        for start in (0..n).step_by(100) {
            let indices: Vec<usize> = (start..n.min(start + 100)).collect();
            means.push(
                self.vae
                    .encode(&self.images(data, &indices)?)?
                    .mean
                    .detach()
                    .flatten_all()?,
            );
        }
        let all = Tensor::cat(&means, 0)?.to_dtype(DType::F64)?;
        let mean = all.mean_all()?.to_scalar::<f64>()?;
        let variance = all
            .affine(1.0, -mean)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f64>()?;
        Ok(1.0 / variance.sqrt().max(1e-8))
    }

    /// The weights that do not learn (a frozen encoder's), which a checkpoint keeps too.
    fn frozen(&self) -> impl Iterator<Item = &(String, Var)> {
        let trainable: std::collections::HashSet<&str> =
            self.state.named().iter().map(|(n, _)| n.as_str()).collect();
        self.named
            .iter()
            .filter(move |(name, _)| !trainable.contains(name.as_str()))
    }

    /// Weights, AdamW's moments and the step (and the discriminator's), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.state.checkpoint_tensors();
        tensors.extend(
            self.frozen()
                .map(|(name, var)| (format!("model.{name}"), var.as_tensor().detach())),
        );
        if let Some(adversary) = &self.adversary {
            tensors.extend(adversary.state.checkpoint_tensors());
        }
        super::state::save_checkpoint(
            path,
            TrainerKind::Vae,
            self.state.step,
            &self.config.to_toml(),
            &tensors,
        )
    }

    /// Continues from [`Self::save`]'s file; a checkpoint of another model is refused.
    pub fn resume(config: VaeTrainConfig, path: &Path, device: &Device) -> Result<Self> {
        let mut trainer = Self::new(config, device)?;
        let loaded = checkpoint::load(path, device)?;
        let header = super::state::read_header(&loaded, path, TrainerKind::Vae)?;
        let saved = VaeTrainConfig::from_toml_str(&header.config).map_err(|e| {
            crate::error::file_error(path, format!("its training config is not valid: {e}"))
        })?;
        super::state::check_same_sections(
            path,
            &saved.to_toml(),
            &trainer.config.to_toml(),
            &["model", "data"],
        )?;
        for (name, var) in trainer.frozen() {
            var.set(&loaded.tensor_like(path, &format!("model.{name}"), var.dims())?)?;
        }
        trainer.state.restore(&loaded, path, header.step)?;
        if let Some(adversary) = &mut trainer.adversary {
            adversary.state.restore(&loaded, path, header.step)?;
        }
        Ok(trainer)
    }

    /// Writes `<dir>/config.json` and `<dir>/diffusion_pytorch_model.safetensors`: the diffusers
    /// layout that the pipelines load as a `vae/` folder.
    pub fn write_diffusers(&self, dir: &Path, scaling_factor: f64) -> Result<()> {
        let io = |e: std::io::Error| Error::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = serde_json::to_string_pretty(&self.config.diffusers_config(scaling_factor))
            .map_err(|e| Error::Msg(e.to_string()))?;
        checkpoint::write_atomically(&dir.join("config.json"), config.as_bytes())?;
        let tensors: Vec<(String, Tensor)> = self
            .named
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        checkpoint::save(
            &dir.join("diffusion_pytorch_model.safetensors"),
            &tensors,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
    }

    /// The current weights by name (copies).
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.named
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?.detach())))
            .collect()
    }
}

/// Grey-level images (the embedded model's data).
fn grey_channels() -> usize {
    1
}

fn vae_layers_per_block_default() -> usize {
    1
}

fn latent_channels_default() -> usize {
    4
}

fn train_encoder_default() -> bool {
    true
}

/// An autoencoder run in a training session: the trainer and its images.
pub struct VaeRun {
    pub trainer: VaeTrainer,
    pub data: LabelledImages,
}

impl super::session::Trainer for VaeRun {
    fn step(&self) -> usize {
        self.trainer.step()
    }

    fn columns(&self) -> &'static [&'static str] {
        &[
            "loss",
            "l1",
            "kl",
            "adversarial",
            "discriminator",
            "grad_norm",
            "learning_rate",
        ]
    }

    fn train_step(&mut self) -> Result<Vec<f64>> {
        let s = self.trainer.train_step(&self.data)?;
        Ok(vec![
            s.loss,
            s.reconstruction,
            s.kl,
            s.adversarial,
            s.discriminator,
            s.grad_norm,
            s.learning_rate,
        ])
    }

    fn save(&mut self, out_dir: &Path) -> Result<()> {
        self.trainer
            .save(&out_dir.join(super::session::CHECKPOINT_FILE))
    }
}
