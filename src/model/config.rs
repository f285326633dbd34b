//! The diffusers `config.json` of each model, read with serde; values this crate cannot honour are
//! errors that name the key and the value.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A value diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks; errors name `key` when a list has the wrong length.
    pub fn expand(&self, n: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::Contradiction(format!(
                "{key} has {} entries but there are {n} blocks",
                v.len()
            ))),
        }
    }
}

/// A key that may be `null` in published configs (SDXL's `upcast_attention`): null reads as
/// the type's default.
fn null_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_padding() -> usize {
    1
}
fn default_silu() -> String {
    "silu".into()
}
fn default_layers() -> PerBlock {
    PerBlock::One(1)
}

/// `UNet2DConditionModel`'s config (the keys SD 1.x, 2.x and Turbo use, and the pixel-DDPM ones).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "latent_channels_default")]
    pub in_channels: usize,
    #[serde(default = "latent_channels_default")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "layers_per_block_default")]
    pub layers_per_block: usize,
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub upcast_attention: bool,
    #[serde(default = "default_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// `"text_time"` (SDXL): a pooled text embedding and six size/crop ids are embedded and
    /// added to the time embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each time id (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the added embedding: pooled text width + 6 x addition_time_embed_dim.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
    #[serde(default)]
    pub conv_in_kernel: Option<usize>,
    #[serde(default)]
    pub conv_out_kernel: Option<usize>,
    #[serde(default)]
    pub resnet_out_scale_factor: Option<f64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn three() -> usize {
    3
}

/// `AutoencoderKL`'s config.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "layers_per_block_default")]
    pub layers_per_block: usize,
    #[serde(default = "latent_channels_default")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Decode in f32 even when asked for f16 (SDXL's VAE overflows in f16); honoured by SDXL
    /// pipelines, as diffusers does.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_scaling() -> f64 {
    0.18215
}

/// `CLIPTextModel`'s config (transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_positions() -> usize {
    77
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}

/// Reads and parses a JSON config; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.display().to_string(),
        message: format!("not a valid config: {e}"),
    })
}

pub(crate) fn unsupported(key: &str, value: impl std::fmt::Display, allowed: &str) -> Error {
    Error::bad_value(key, value, allowed)
}

/// Sizes a layer is built from must be at least one: a zero would divide by zero or build an
/// empty layer.
fn check_positive(sizes: &[(&str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(unsupported(key, 0, "at least 1")),
        None => Ok(()),
    }
}

/// GroupNorm splits each width into `groups` equal groups.
fn check_groups(channels: &[usize], groups: usize) -> Result<()> {
    check_positive(&[("norm_num_groups", groups)])?;
    for (i, c) in channels.iter().enumerate() {
        check_positive(&[("block_out_channels", *c)])?;
        if c % groups != 0 {
            return Err(Error::Contradiction(format!(
                "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {groups}"
            )));
        }
    }
    Ok(())
}

impl UNetConfig {
    /// Checks the settings this implementation does not cover.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(unsupported(
                "block_out_channels",
                "[]",
                "at least one block",
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Contradiction(format!(
                "block_out_channels has {n} entries, down_block_types {} and up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D") {
                return Err(unsupported(
                    "down_block_types",
                    t,
                    "CrossAttnDownBlock2D, DownBlock2D",
                ));
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(unsupported(
                    "up_block_types",
                    t,
                    "CrossAttnUpBlock2D, UpBlock2D",
                ));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if !matches!(m.as_str(), "UNetMidBlock2DCrossAttn" | "UNetMidBlock2D") {
                return Err(unsupported(
                    "mid_block_type",
                    m,
                    "UNetMidBlock2DCrossAttn, UNetMidBlock2D",
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn, "silu"));
        }
        let checks: [(&str, bool, String, &str); 9] = [
            (
                "time_embedding_type",
                self.time_embedding_type
                    .as_deref()
                    .is_some_and(|v| v != "positional"),
                format!("{:?}", self.time_embedding_type),
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift
                    .as_deref()
                    .is_some_and(|v| v != "default"),
                format!("{:?}", self.resnet_time_scale_shift),
                "default",
            ),
            (
                "addition_embed_type",
                self.addition_embed_type
                    .as_deref()
                    .is_some_and(|v| v != "text_time"),
                format!("{:?}", self.addition_embed_type),
                "null or text_time",
            ),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.is_some(),
                format!("{:?}", self.encoder_hid_dim),
                "null",
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_some(),
                format!("{:?}", self.class_embed_type),
                "null (use num_class_embeds)",
            ),
            (
                "dual_cross_attention",
                self.dual_cross_attention == Some(true),
                "true".into(),
                "false",
            ),
            (
                "only_cross_attention",
                self.only_cross_attention
                    .as_ref()
                    .is_some_and(|v| v != &serde_json::Value::Bool(false)),
                format!("{:?}", self.only_cross_attention),
                "false",
            ),
            (
                "conv_in_kernel",
                self.conv_in_kernel.is_some_and(|k| k != 3)
                    || self.conv_out_kernel.is_some_and(|k| k != 3),
                format!("{:?}/{:?}", self.conv_in_kernel, self.conv_out_kernel),
                "3",
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_some(),
                format!("{:?}", self.time_cond_proj_dim),
                "null",
            ),
        ];
        for (key, bad, value, allowed) in checks {
            if bad {
                return Err(unsupported(key, value, allowed));
            }
        }
        if self.resnet_out_scale_factor.is_some_and(|f| f != 1.0) {
            return Err(unsupported(
                "resnet_out_scale_factor",
                format!("{:?}", self.resnet_out_scale_factor),
                "1.0",
            ));
        }
        let has_cross = self
            .down_block_types
            .iter()
            .any(|t| t.starts_with("CrossAttn"));
        if has_cross && self.cross_attention_dim.is_none() {
            return Err(Error::Contradiction(
                "cross-attention blocks need cross_attention_dim".into(),
            ));
        }
        if self.addition_embed_type.as_deref() == Some("text_time") {
            let (Some(time_dim), Some(input_dim)) = (
                self.addition_time_embed_dim,
                self.projection_class_embeddings_input_dim,
            ) else {
                return Err(Error::Contradiction(
                    "addition_embed_type text_time needs addition_time_embed_dim and \
                     projection_class_embeddings_input_dim"
                        .into(),
                ));
            };
            check_positive(&[("addition_time_embed_dim", time_dim)])?;
            if input_dim <= 6 * time_dim {
                return Err(Error::Contradiction(format!(
                    "projection_class_embeddings_input_dim = {input_dim} leaves no room for the \
                     pooled text embedding beside 6 x addition_time_embed_dim = {}",
                    6 * time_dim
                )));
            }
        }
        check_groups(&self.block_out_channels, self.norm_num_groups)?;
        check_positive(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("cross_attention_dim", self.cross_attention_dim.unwrap_or(1)),
        ])?;
        // Heads matter where there is attention: the cross-attention blocks (up block n-1-i
        // mirrors down block i) and a cross-attention mid block at the last width.
        let heads = self.heads()?;
        let mid_attends = has_cross
            && self
                .mid_block_type
                .as_deref()
                .is_none_or(|m| m == "UNetMidBlock2DCrossAttn");
        let attends = |i: usize| {
            self.down_block_types[i].starts_with("CrossAttn")
                || self.up_block_types[n - 1 - i].starts_with("CrossAttn")
                || (mid_attends && i == n - 1)
        };
        for (i, (c, h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if !attends(i) {
                continue;
            }
            check_positive(&[("num_attention_heads / attention_head_dim", *h)])?;
            if c % h != 0 {
                return Err(Error::Contradiction(format!(
                    "block_out_channels[{i}] = {c} does not split into {h} attention heads"
                )));
            }
        }
        Ok(())
    }

    /// Attention heads per down block. diffusers' historical naming: in SD 1.x/2.x configs
    /// `attention_head_dim` holds the number of heads when `num_attention_heads` is absent.
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.expand(n, "num_attention_heads"),
            (None, Some(h)) => h.expand(n, "attention_head_dim"),
            (None, None) => Ok(vec![8; n]),
        }
    }
}

impl VaeConfig {
    pub fn validate(&self) -> Result<()> {
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(unsupported("down_block_types", t, "DownEncoderBlock2D"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(unsupported("up_block_types", t, "UpDecoderBlock2D"));
            }
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn, "silu"));
        }
        if self.block_out_channels.len() != self.down_block_types.len()
            || self.block_out_channels.len() != self.up_block_types.len()
        {
            return Err(Error::Contradiction(
                "block_out_channels, down_block_types and up_block_types differ in length".into(),
            ));
        }
        if self.block_out_channels.is_empty() {
            return Err(unsupported(
                "block_out_channels",
                "[]",
                "at least one block",
            ));
        }
        check_groups(&self.block_out_channels, self.norm_num_groups)?;
        check_positive(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ])?;
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(unsupported(
                "scaling_factor",
                self.scaling_factor,
                "a finite, non-zero number",
            ));
        }
        Ok(())
    }
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(unsupported(
                "hidden_act",
                &self.hidden_act,
                "quick_gelu, gelu",
            ));
        }
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Contradiction(format!(
                "hidden_size = {} is not divisible by num_attention_heads = {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

/// Stable Diffusion's four latent channels.
fn latent_channels_default() -> usize {
    4
}

/// diffusers' default resnets per block.
fn layers_per_block_default() -> usize {
    2
}
