//! The config of `diffuse train-vae`: the image folders, the autoencoder's sizes and its
//! training (L1 + KL, optionally adversarial).

use super::common::{config_dir, parse_toml, read_config, relative_to};
use crate::data::image_set::ImageSources;
use crate::error::{Error, Result};
use crate::model::config::VaeConfig;
use crate::train::optim::{AdamWParams, LrSchedule};
use crate::train::state::UpdateRule;
use serde::{Deserialize, Serialize};
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
    /// MNIST-layout IDX folders whose training images are pooled, each with a `classes.json`.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Emoji folders (`metadata.jsonl` and RGBA pictures), pooled after the IDX folders.
    #[serde(default)]
    pub emoji: Vec<PathBuf>,
    /// At most this many images of each class of an IDX folder (the first ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class_limit: Option<usize>,
    /// How many times each emoji is in the pool training draws from.
    #[serde(default = "one_each")]
    pub emoji_repeat: usize,
    /// The colour transparent emoji are composited over.
    #[serde(default = "white")]
    pub background: [u8; 3],
    /// Images are enlarged by a whole factor and padded with black to this square size (a
    /// multiple of the downsampling); emoji are averaged down to it.
    pub image_size: usize,
}

impl VaeDataConfig {
    pub fn sources(&self) -> ImageSources {
        ImageSources {
            idx: self.paths.clone(),
            emoji: self.emoji.clone(),
            emoji_repeat: self.emoji_repeat,
            per_class_limit: self.per_class_limit,
        }
    }
}

/// Every picture once in the pool.
pub fn one_each() -> usize {
    1
}

/// White, the background emoji are drawn on.
pub fn white() -> [u8; 3] {
    [255, 255, 255]
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
    #[serde(default = "grad_clip_default")]
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
    #[serde(default = "checkpoint_every_default")]
    pub checkpoint_every: usize,
    #[serde(default = "log_every_default")]
    pub log_every: usize,
}

fn discriminator_channels() -> usize {
    32
}
fn norm_groups_default() -> usize {
    8
}
fn grad_clip_default() -> f64 {
    1.0
}
fn kl_weight() -> f64 {
    1e-6
}
fn checkpoint_every_default() -> usize {
    500
}
fn log_every_default() -> usize {
    50
}

impl VaeTrainConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path`, its relative paths (data, init, output) taken from its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut config = read_config(path, Self::from_toml_str)?;
        let base = config_dir(path);
        for data in config.data.paths.iter_mut().chain(&mut config.data.emoji) {
            relative_to(base, data);
        }
        if let Some(init) = &mut config.train.init {
            relative_to(base, init);
        }
        relative_to(base, &mut config.train.out_dir);
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a VaeTrainConfig always serialises")
    }

    /// How the autoencoder's (and the discriminator's) gradients become updates.
    pub fn update_rule(&self) -> UpdateRule {
        UpdateRule {
            learning_rate: LrSchedule::constant(self.train.learning_rate, self.train.warmup_steps),
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
