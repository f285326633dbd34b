//! The config of a text-to-image latent diffusion run (`[model] autoencoder = "vae"`): the
//! captioned data, the frozen autoencoder and tokenizer, the text encoder's and U-Net's sizes,
//! the diffusion process and the `[train]` section.

use super::common::{parse_toml, relative_to, OptimConfig};
use crate::diffusion::config::{DiffusionConfig, Loss};
use crate::error::{Error, Result};
use crate::model::config::UNetConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `diffuse train`'s TOML config for a text-to-image latent model (`model.autoencoder = "vae"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmTrainConfig {
    pub data: LdmDataConfig,
    pub model: LdmModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    pub train: OptimConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmDataConfig {
    /// MNIST-layout IDX folders, each with a `classes.json`; their classes are numbered on.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Emoji folders (`metadata.jsonl` and RGBA pictures), after the IDX folders.
    #[serde(default)]
    pub emoji: Vec<PathBuf>,
    /// At most this many images of each class of an IDX folder (the first ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class_limit: Option<usize>,
    /// How many times each emoji is in the pool training draws from.
    #[serde(default = "super::vae::one_each")]
    pub emoji_repeat: usize,
    /// The colour transparent emoji are composited over.
    #[serde(default = "super::vae::white")]
    pub background: [u8; 3],
    /// Images are enlarged by a whole factor and padded with black to this square size before
    /// encoding; emoji are averaged down to it.
    pub image_size: usize,
    /// The fraction of examples trained with the empty caption (classifier-free guidance).
    #[serde(default = "caption_dropout")]
    pub caption_dropout: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LatentAutoencoder {
    /// A trained `AutoencoderKL` folder (diffusers layout), frozen.
    Vae,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TextConditioning {
    /// Captions through a CLIP-architecture text encoder into the U-Net's cross-attention.
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LdmModelConfig {
    pub autoencoder: LatentAutoencoder,
    pub conditioning: TextConditioning,
    /// The frozen autoencoder: a diffusers `vae/` folder (from `diffuse train-vae`).
    pub vae: PathBuf,
    /// A CLIP tokenizer folder (`tokenizer.json`, ...).
    pub tokenizer: PathBuf,
    pub text_hidden_size: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// The text encoder's MLP width (4x the hidden size when left out, as CLIP).
    #[serde(default)]
    pub text_intermediate_size: Option<usize>,
    /// The U-Net's channels per level; every level has cross-attention.
    pub block_out_channels: Vec<usize>,
    #[serde(default = "layers_per_block_default")]
    pub layers_per_block: usize,
    /// Attention heads per transformer (diffusers' SD 1.x `attention_head_dim`).
    #[serde(default = "attention_heads_default")]
    pub attention_heads: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// A pipeline folder this run's text encoder and U-Net start from (the averaged weights a
    /// run of the same model wrote), with fresh optimizer moments: how training goes on where
    /// the checkpoint of the earlier run is gone but its pipeline was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
}

fn caption_dropout() -> f64 {
    0.1
}
fn groups() -> usize {
    32
}

impl LdmDataConfig {
    pub fn sources(&self) -> crate::data::image_set::ImageSources {
        crate::data::image_set::ImageSources {
            idx: self.paths.clone(),
            emoji: self.emoji.clone(),
            emoji_repeat: self.emoji_repeat,
            per_class_limit: self.per_class_limit,
        }
    }
}

impl LdmTrainConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Takes the config's relative paths (data, autoencoder, tokenizer, output) from `base`,
    /// the config file's folder.
    pub fn rebase(&mut self, base: &Path) {
        for data in self.data.paths.iter_mut().chain(&mut self.data.emoji) {
            relative_to(base, data);
        }
        relative_to(base, &mut self.model.vae);
        relative_to(base, &mut self.model.tokenizer);
        if let Some(init) = &mut self.model.init {
            relative_to(base, init);
        }
        relative_to(base, &mut self.train.out_dir);
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an LdmTrainConfig always serialises")
    }

    /// Settings that parse but cannot be honoured together.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if self.data.paths.is_empty() {
            return Err(Error::bad_value("data.paths", "[]", "at least one folder"));
        }
        if !(0.0..1.0).contains(&self.data.caption_dropout) {
            return Err(Error::bad_value(
                "data.caption_dropout",
                self.data.caption_dropout,
                "a fraction in [0, 1)",
            ));
        }
        if m.text_heads == 0 || !m.text_hidden_size.is_multiple_of(m.text_heads) {
            return Err(Error::Contradiction(format!(
                "model.text_hidden_size = {} is not a multiple of model.text_heads = {}",
                m.text_hidden_size, m.text_heads
            )));
        }
        if let Some(c) = m
            .block_out_channels
            .iter()
            .find(|c| *c % m.norm_num_groups != 0 || *c % m.attention_heads != 0)
        {
            return Err(Error::Contradiction(format!(
                "model.block_out_channels entry {c} is not a multiple of model.norm_num_groups = {} \
                 and model.attention_heads = {}",
                m.norm_num_groups, m.attention_heads
            )));
        }
        if self.diffusion.loss != Loss::Simple {
            return Err(Error::Contradiction(
                "a text-to-image latent model trains with diffusion.loss = \"simple\" only".into(),
            ));
        }
        let t = &self.train;
        t.validate_schedule_and_weighting()?;
        if t.batch_size == 0 || t.steps == 0 || t.checkpoint_every == 0 {
            return Err(Error::bad_value(
                "train.batch_size / train.steps / train.checkpoint_every",
                0,
                "positive integers",
            ));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return Err(Error::bad_value("train.ema_decay", t.ema_decay, "[0, 1)"));
        }
        serde_json::from_value::<UNetConfig>(self.unet_config_json(4, 8))
            .map_err(|e| Error::Msg(format!("model section: {e}")))?
            .validate()?;
        Ok(())
    }

    /// transformers' `CLIPTextModel` config of the text encoder (the real CLIP vocabulary).
    pub fn text_config_json(&self) -> serde_json::Value {
        let m = &self.model;
        serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": 49408,
            "hidden_size": m.text_hidden_size,
            "intermediate_size": m.text_intermediate_size.unwrap_or(4 * m.text_hidden_size),
            "num_hidden_layers": m.text_layers,
            "num_attention_heads": m.text_heads,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": m.text_hidden_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            "torch_dtype": "float32",
        })
    }

    /// diffusers' `UNet2DConditionModel` config for latents of `channels`, `latent_size` square: cross-attention
    /// at every level, SD 1.x's block layout.
    pub fn unet_config_json(&self, channels: usize, latent_size: usize) -> serde_json::Value {
        let m = &self.model;
        let n = m.block_out_channels.len();
        let mut down = vec!["CrossAttnDownBlock2D"; n];
        let mut up = vec!["CrossAttnUpBlock2D"; n];
        if n > 1 {
            // The deepest level of SD 1.x has no attention; at a 2x2 latent it would be moot.
            down[n - 1] = "DownBlock2D";
            up[0] = "UpBlock2D";
        }
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": latent_size,
            "in_channels": channels,
            "out_channels": channels,
            "block_out_channels": m.block_out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": m.layers_per_block,
            "attention_head_dim": m.attention_heads,
            "cross_attention_dim": m.text_hidden_size,
            "norm_num_groups": m.norm_num_groups,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "act_fn": "silu",
            "downsample_padding": 1,
            "center_input_sample": false,
            "use_linear_projection": false,
        })
    }

    /// The diffusion section as the pipeline's scheduler config (DDIM by default at sampling,
    /// with SD's offset of one).
    pub fn scheduler_json(&self) -> serde_json::Value {
        let d = &self.diffusion;
        let beta_schedule = d.beta_schedule_name();
        serde_json::json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": d.num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": d.beta_start,
            "beta_end": d.beta_end,
            "prediction_type": d.prediction_type.config_name(),
            "clip_sample": false,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        })
    }
}

fn layers_per_block_default() -> usize {
    2
}

fn attention_heads_default() -> usize {
    4
}
