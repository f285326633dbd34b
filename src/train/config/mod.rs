//! The TOML configs of the trainers: data, model, diffusion process and optimisation, each a
//! serde struct with defaults; unknown keys are errors that name the key, and paths in a config
//! file are relative to the file. `diffuse train` reads a pixel-space ([`TrainConfig`]) or a
//! latent text-to-image config ([`LdmTrainConfig`]), as its `[model] autoencoder` tag says
//! ([`TrainingConfig`]); `diffuse train-vae` reads [`VaeTrainConfig`].

pub mod common;
pub mod finetune;
pub mod judge;
pub mod latent;
pub mod pixel;
pub mod vae;

pub use common::{config_dir, parse_toml, read_config, relative_to, OptimConfig};
pub use finetune::FinetuneSettings;
pub use judge::JudgeTrainConfig;
pub use latent::LdmTrainConfig;
pub use pixel::{DataConfig, TrainConfig};
pub use vae::VaeTrainConfig;

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A `diffuse train` config of either kind.
#[derive(Debug, Clone)]
pub enum TrainingConfig {
    Pixel(TrainConfig),
    Latent(LdmTrainConfig),
}

/// The values of `[model] autoencoder`, the tag that says which config a file is.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ModelKind {
    None,
    Vae,
}

impl TrainingConfig {
    /// Reads the `[model] autoencoder` tag, then the whole file as that kind's config.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Tagged {
            model: Tag,
        }
        #[derive(Deserialize)]
        struct Tag {
            autoencoder: ModelKind,
        }
        let tagged: Tagged =
            parse_toml(text).map_err(|e| Error::Msg(format!("which model to train: {e}")))?;
        Ok(match tagged.model.autoencoder {
            ModelKind::None => Self::Pixel(TrainConfig::from_toml_str(text)?),
            ModelKind::Vae => Self::Latent(LdmTrainConfig::from_toml_str(text)?),
        })
    }

    /// Reads `path`, its relative paths taken from its folder; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let base = config_dir(path);
        Ok(match read_config(path, Self::from_toml_str)? {
            Self::Pixel(mut config) => {
                config.rebase(base);
                Self::Pixel(config)
            }
            Self::Latent(mut config) => {
                config.rebase(base);
                Self::Latent(config)
            }
        })
    }
}
