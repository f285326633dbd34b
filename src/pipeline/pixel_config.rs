//! What describes a pixel-space model: the `[model]` and `[diffusion]` sections of its training
//! config, which its checkpoints and weights files carry as metadata. The training config
//! (`train::config::TrainConfig`) adds the data and optimisation sections around them.

use crate::diffusion::config::{DiffusionConfig, Loss};
use crate::diffusion::schedule::PredictionType;
use crate::diffusion::variance::Variance;
use crate::error::{Error, Result};
use crate::model::config::UNetConfig;
use crate::sampler::SchedulerConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Autoencoder {
    /// Pixel-space diffusion (Ho et al. 2020).
    None,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    None,
    /// A learned embedding of the class label added to the timestep embedding.
    Class,
}

/// The `[model]` section of a pixel-space config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PixelModelConfig {
    pub autoencoder: Autoencoder,
    #[serde(default = "conditioning_none")]
    pub conditioning: Conditioning,
    /// Number of classes when `conditioning = "class"`.
    #[serde(default)]
    pub num_classes: Option<usize>,
    pub image_size: usize,
    #[serde(default = "grey_channels")]
    pub channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "layers_per_block_default")]
    pub layers_per_block: usize,
    #[serde(default = "norm_groups_default")]
    pub norm_num_groups: usize,
}

/// A pixel-space model: its network and its diffusion process. Read from a config's TOML, the
/// other sections ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PixelModel {
    pub model: PixelModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
}

impl PixelModel {
    /// The `[model]` and `[diffusion]` sections of a training config's TOML, checked.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let described: Self = toml::from_str(text).map_err(|e| Error::Msg(e.to_string()))?;
        described.validate()?;
        Ok(described)
    }

    /// Settings that parse but cannot be honoured together.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        match (m.conditioning, m.num_classes) {
            (Conditioning::Class, None | Some(0)) => {
                return Err(Error::Contradiction(
                    "model.conditioning = \"class\" needs model.num_classes".into(),
                ))
            }
            (Conditioning::None, Some(_)) => {
                return Err(Error::Contradiction(
                    "model.num_classes is set but model.conditioning = \"none\"".into(),
                ))
            }
            _ => {}
        }
        if let Some(c) = m
            .block_out_channels
            .iter()
            .find(|c| *c % m.norm_num_groups != 0)
        {
            return Err(Error::Contradiction(format!(
                "model.block_out_channels entry {c} is not a multiple of model.norm_num_groups = {}",
                m.norm_num_groups
            )));
        }
        let d = &self.diffusion;
        if d.loss == Loss::Hybrid && d.variance != Variance::LearnedRange {
            return Err(Error::Contradiction(
                "diffusion.loss = \"hybrid\" trains a variance: it needs diffusion.variance = \"learned_range\"".into(),
            ));
        }
        if d.variance == Variance::LearnedRange && d.loss != Loss::Hybrid {
            return Err(Error::Contradiction(
                "diffusion.variance = \"learned_range\" is only trained by diffusion.loss = \"hybrid\"".into(),
            ));
        }
        if d.prediction_type != PredictionType::Epsilon && d.variance == Variance::LearnedRange {
            return Err(Error::Contradiction(
                "a learned variance is implemented for diffusion.prediction_type = \"epsilon\" only"
                    .into(),
            ));
        }
        self.unet_config()?.validate()?;
        self.scheduler_config().noise_schedule()?;
        Ok(())
    }

    /// The U-Net's diffusers config: DownBlock2D/UpBlock2D throughout (no attention), a class
    /// embedding for class-conditional models, twice the channels out for a learned variance.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let m = &self.model;
        let n = m.block_out_channels.len();
        let out_channels = if self.diffusion.variance.is_learned() {
            2 * m.channels
        } else {
            m.channels
        };
        let value = serde_json::json!({
            "in_channels": m.channels,
            "out_channels": out_channels,
            "sample_size": m.image_size,
            "block_out_channels": m.block_out_channels,
            "down_block_types": vec!["DownBlock2D"; n],
            "up_block_types": vec!["UpBlock2D"; n],
            "mid_block_type": "UNetMidBlock2D",
            "layers_per_block": m.layers_per_block,
            "norm_num_groups": m.norm_num_groups,
            "num_class_embeds": m.num_classes,
        });
        serde_json::from_value(value).map_err(|e| Error::Msg(format!("model section: {e}")))
    }

    /// DDPM's scheduler over the diffusion section, x_0 clipped to [-1, 1] as the paper's
    /// sampler does: what every sampler of a pixel model reads.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        let d = &self.diffusion;
        SchedulerConfig {
            class_name: Some("DDPMScheduler".into()),
            num_train_timesteps: d.num_train_timesteps,
            beta_schedule: d.beta_schedule(),
            prediction_type: d.prediction_type,
            variance_type: d.variance,
            clip_sample: Some(true),
            clip_sample_range: 1.0,
            ..SchedulerConfig::default()
        }
    }
}

fn conditioning_none() -> Conditioning {
    Conditioning::None
}

/// Grey-level images (MNIST, Fashion-MNIST).
fn grey_channels() -> usize {
    1
}

fn layers_per_block_default() -> usize {
    2
}

fn norm_groups_default() -> usize {
    32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduler built from the section equals the one diffusers' parser reads from the
    /// equivalent DDPMScheduler config.
    #[test]
    fn scheduler_equals_the_parsed_diffusers_config() {
        for (schedule, variance) in [
            ("linear", "fixed_small"),
            ("cosine", "learned_range"),
            ("scaled_linear", "fixed_large"),
        ] {
            let described = PixelModel::from_toml_str(&format!(
                "[model]\nautoencoder = \"none\"\nimage_size = 8\nblock_out_channels = [32]\n\
                 [diffusion]\nschedule = \"{schedule}\"\nvariance = \"{variance}\"\n{}",
                if variance == "learned_range" {
                    "loss = \"hybrid\"\n"
                } else {
                    ""
                }
            ))
            .unwrap();
            let diffusers_name = described.diffusion.beta_schedule_name();
            let parsed = SchedulerConfig::from_json_str(
                &serde_json::json!({
                    "_class_name": "DDPMScheduler",
                    "num_train_timesteps": 1000,
                    "beta_schedule": diffusers_name,
                    "beta_start": 1e-4,
                    "beta_end": 0.02,
                    "prediction_type": "epsilon",
                    "variance_type": variance,
                    "clip_sample": true,
                    "clip_sample_range": 1.0,
                })
                .to_string(),
            )
            .unwrap();
            assert_eq!(
                format!("{:?}", described.scheduler_config()),
                format!("{parsed:?}"),
                "{schedule}, {variance}"
            );
        }
    }
}
