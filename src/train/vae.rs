//! Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1
//! and appendix G) on small gray images: the reconstruction loss plus a small KL term that keeps
//! the latent posterior near N(0, I). The perceptual and adversarial terms of the paper are left
//! out; at 28x28 a pixel loss reconstructs digits and clothes well.
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k), so a resumed run takes the
//! steps an uninterrupted one would have taken.

use super::config::VaeTrainConfig;
use super::discriminator::{discriminator_hinge_loss, generator_hinge_loss, PatchDiscriminator};
use super::state::{TrainerKind, TrainerState};
use super::{named_vars, seeded_init};
use crate::checkpoint;
use crate::data::image_set::ImageSet;
use crate::error::{Error, Result};
use crate::model::vae::AutoencoderKL;
use crate::sampler::noise::SeededNoise;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;

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

    /// The images at `indices` on the trainer's device.
    fn images(&self, data: &ImageSet, indices: &[usize]) -> Result<Tensor> {
        Ok(data.batch(indices, &Device::Cpu)?.to_device(&self.device)?)
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
    pub fn train_step(&mut self, data: &ImageSet) -> Result<VaeStepStats> {
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
    /// of `n` images spread evenly over `data` (every source of a pooled set counts).
    pub fn evaluate(&self, data: &ImageSet, n: usize) -> Result<(f64, f64)> {
        let spread = evenly_spaced(data.len(), n);
        let n = spread.len();
        let (mut l1, mut squared) = (0.0, 0.0);
        for indices in spread.chunks(100) {
            let x = self.images(data, indices)?;
            let error = (self.reconstruct(&x)?.clamp(-1f32, 1f32)? - &x)?;
            let count = indices.len() as f64;
            l1 += error.abs()?.mean_all()?.to_scalar::<f32>()? as f64 * count;
            squared += error.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 * count;
        }
        let (l1, mse) = (l1 / n as f64, squared / n as f64);
        // On [0, 1] the squared error is a quarter of that on [-1, 1].
        Ok((l1, 10.0 * (1.0 / (mse / 4.0)).log10()))
    }

    /// 1 / standard deviation of the posterior means of up to 1000 images spread evenly over
    /// `data`: the factor that gives the diffusion model latents of unit variance (LDM section
    /// 4.3.2).
    pub fn scaling_factor(&self, data: &ImageSet) -> Result<f64> {
        let mut means = Vec::new();
        for indices in evenly_spaced(data.len(), 1000).chunks(100) {
            means.push(
                self.vae
                    .encode(&self.images(data, indices)?)?
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
        let (loaded, step) = super::state::open_for_resume(
            path,
            device,
            TrainerKind::Vae,
            &trainer.config.to_toml(),
            &["model", "data"],
            |saved| Ok(VaeTrainConfig::from_toml_str(saved)?.to_toml()),
        )?;
        for (name, var) in trainer.frozen() {
            var.set(&loaded.tensor_like(path, &format!("model.{name}"), var.dims())?)?;
        }
        trainer.state.restore(&loaded, path, step)?;
        if let Some(adversary) = &mut trainer.adversary {
            adversary.state.restore(&loaded, path, step)?;
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

/// `n` indices (or all `len`, if fewer) spread evenly over 0..`len`: i * len / n.
pub fn evenly_spaced(len: usize, n: usize) -> Vec<usize> {
    let n = n.min(len);
    (0..n).map(|i| i * len / n).collect()
}

/// An autoencoder run in a training session: the trainer and its images.
pub struct VaeRun {
    pub trainer: VaeTrainer,
    pub data: ImageSet,
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
