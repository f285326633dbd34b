//! The TOML configs of `diffuse train`: data, model, diffusion process and optimisation, each a
//! serde struct with defaults. Unknown keys are errors that name the key. A config names the
//! model it trains in `[model] autoencoder`: "none" for pixel space ([`TrainConfig`]), "vae" for
//! a latent text-to-image model (`ldm::LdmTrainConfig`); [`TrainingConfig`] reads either. Paths
//! in a config file are relative to the file.

use crate::error::{Error, Result};
use crate::model::config::UNetConfig;
use crate::sampler::config::SchedulerConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A folder with MNIST-layout IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    pub path: PathBuf,
    /// The dataset's name, used to find its judge (`mnist`, `fashion-mnist`).
    #[serde(default)]
    pub name: Option<String>,
    /// Mirror images left-right at random. Only for data whose mirror images are as likely as the
    /// originals: not digits, and not Fashion-MNIST, whose shoes all point one way (a model
    /// trained with flips draws mirrored shoes, and the judge reads them as bags).
    #[serde(default)]
    pub random_flip: bool,
}

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
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
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// DDPM's linear betas.
    Linear,
    /// Linear in sqrt(beta) (LDM, Stable Diffusion).
    ScaledLinear,
    /// Nichol & Dhariwal 2021, eq. 17.
    Cosine,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// sigma_t^2 = beta~_t (DDPM section 3.2).
    FixedSmall,
    /// sigma_t^2 = beta_t.
    FixedLarge,
    /// Learned interpolation between log beta_t and log beta~_t (Nichol & Dhariwal eq. 15).
    LearnedRange,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// L_simple, DDPM eq. 14.
    Simple,
    /// L_simple + lambda L_vlb with the mean's gradient stopped in L_vlb (Nichol & Dhariwal eq. 16).
    Hybrid,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    #[serde(default = "linear")]
    pub schedule: ScheduleKind,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "train_timesteps_default")]
    pub num_train_timesteps: usize,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default = "fixed_small")]
    pub variance: Variance,
    #[serde(default = "simple")]
    pub loss: Loss,
    /// lambda of the hybrid loss.
    #[serde(default = "vlb_weight")]
    pub vlb_weight: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: ScheduleKind::Linear,
            beta_start: beta_start(),
            beta_end: beta_end(),
            num_train_timesteps: 1000,
            prediction_type: epsilon(),
            variance: Variance::FixedSmall,
            loss: Loss::Simple,
            vlb_weight: vlb_weight(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub steps: usize,
    #[serde(default = "batch")]
    pub batch_size: usize,
    #[serde(default = "learning_rate")]
    pub learning_rate: f64,
    /// Linear warm-up of the learning rate over this many steps.
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns it off.
    #[serde(default = "one_f")]
    pub grad_clip: f64,
    #[serde(default = "ema_decay")]
    pub ema_decay: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "runs_dir")]
    pub out_dir: PathBuf,
    #[serde(default = "steps_between_default")]
    pub checkpoint_every: usize,
    /// A sample grid every this many steps; 0 turns it off.
    #[serde(default = "steps_between_default")]
    pub sample_every: usize,
    #[serde(default = "log_every")]
    pub log_every: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    pub train: OptimConfig,
}

fn conditioning_none() -> Conditioning {
    Conditioning::None
}
fn one_f() -> f64 {
    1.0
}
fn default_groups() -> usize {
    32
}
fn linear() -> ScheduleKind {
    ScheduleKind::Linear
}
fn beta_start() -> f64 {
    1e-4
}
fn beta_end() -> f64 {
    0.02
}
fn epsilon() -> String {
    "epsilon".into()
}
fn fixed_small() -> Variance {
    Variance::FixedSmall
}
fn simple() -> Loss {
    Loss::Simple
}
fn vlb_weight() -> f64 {
    0.001
}
fn batch() -> usize {
    64
}
fn learning_rate() -> f64 {
    2e-4
}
fn ema_decay() -> f64 {
    0.999
}
fn runs_dir() -> PathBuf {
    PathBuf::from("runs/ddpm")
}
fn log_every() -> usize {
    50
}

/// A TOML document as a config struct (unknown keys are errors that name the key, through each
/// struct's `deny_unknown_fields`).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| Error::Msg(e.to_string()))
}

/// Reads the config file at `path` with `parse`, naming the file in any error.
pub fn read_config<T>(path: &Path, parse: impl Fn(&str) -> Result<T>) -> Result<T> {
    let file_error = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    parse(&text).map_err(|e| file_error(e.to_string()))
}

/// A path from a config file: relative ones are taken from the file's folder `base`.
pub fn relative_to(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// The folder a config file's relative paths start from.
pub fn config_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// A `diffuse train` config of either kind.
#[derive(Debug, Clone)]
pub enum TrainingConfig {
    Pixel(TrainConfig),
    Latent(super::ldm::LdmTrainConfig),
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
            ModelKind::Vae => Self::Latent(super::ldm::LdmTrainConfig::from_toml_str(text)?),
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

impl TrainConfig {
    /// Takes the config's relative paths from `base` (the config file's folder).
    pub fn rebase(&mut self, base: &Path) {
        relative_to(base, &mut self.data.path);
        relative_to(base, &mut self.train.out_dir);
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path`, its relative paths taken from its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut config = read_config(path, Self::from_toml_str)?;
        config.rebase(config_dir(path));
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a TrainConfig always serialises")
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
        if d.prediction_type != "epsilon" && d.variance == Variance::LearnedRange {
            return Err(Error::Contradiction(
                "a learned variance is implemented for diffusion.prediction_type = \"epsilon\" only"
                    .into(),
            ));
        }
        crate::schedule::PredictionType::parse(&d.prediction_type)?;
        let t = &self.train;
        if t.batch_size == 0 || t.steps == 0 {
            return Err(Error::bad_value(
                "train.batch_size / train.steps",
                0,
                "positive integers",
            ));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return Err(Error::bad_value("train.ema_decay", t.ema_decay, "[0, 1)"));
        }
        if t.checkpoint_every == 0 {
            return Err(Error::bad_value(
                "train.checkpoint_every",
                0,
                "a positive step count",
            ));
        }
        self.unet_config()?.validate()?;
        self.scheduler_config()?;
        Ok(())
    }

    /// The U-Net's diffusers config: DownBlock2D/UpBlock2D throughout (no attention), a class
    /// embedding for class-conditional models, twice the channels out for a learned variance.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let m = &self.model;
        let n = m.block_out_channels.len();
        let out_channels = if self.diffusion.variance == Variance::LearnedRange {
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

    /// The diffusion section as a diffusers `DDPMScheduler` config, so every sampler reads it.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        let d = &self.diffusion;
        let beta_schedule = match d.schedule {
            ScheduleKind::Linear => "linear",
            ScheduleKind::ScaledLinear => "scaled_linear",
            ScheduleKind::Cosine => "squaredcos_cap_v2",
        };
        let variance_type = match d.variance {
            Variance::FixedSmall => "fixed_small",
            Variance::FixedLarge => "fixed_large",
            Variance::LearnedRange => "learned_range",
        };
        let json = serde_json::json!({
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": d.num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": d.beta_start,
            "beta_end": d.beta_end,
            "prediction_type": d.prediction_type,
            "variance_type": variance_type,
            "clip_sample": true,
            "clip_sample_range": 1.0,
        });
        SchedulerConfig::from_json_str(&json.to_string())
            .map_err(|e| Error::Msg(format!("diffusion section: {e}")))
    }
}

/// Grey-level images (MNIST, Fashion-MNIST).
fn grey_channels() -> usize {
    1
}

fn layers_per_block_default() -> usize {
    2
}

/// DDPM's T = 1000.
fn train_timesteps_default() -> usize {
    1000
}

/// Steps between checkpoints and between sample grids.
fn steps_between_default() -> usize {
    1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[data]
path = "data/mnist"
[model]
autoencoder = "none"
image_size = 28
block_out_channels = [32, 64]
[train]
steps = 10
"#;

    #[test]
    fn defaults_are_the_ddpm_recipe_and_round_trip() {
        let config = TrainConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(config.diffusion, DiffusionConfig::default());
        assert_eq!(config.diffusion.num_train_timesteps, 1000);
        let again = TrainConfig::from_toml_str(&config.to_toml()).unwrap();
        assert_eq!(again, config);
        let unet = config.unet_config().unwrap();
        assert_eq!((unet.in_channels, unet.out_channels), (1, 1));
    }

    #[test]
    fn unknown_and_contradictory_keys_are_named() {
        let err =
            TrainConfig::from_toml_str(&MINIMAL.replace("steps = 10", "steps = 10\nstepz = 3"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("stepz"), "{err}");
        let err = TrainConfig::from_toml_str(&MINIMAL.replace(
            "autoencoder = \"none\"",
            "autoencoder = \"none\"\nconditioning = \"class\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_classes"), "{err}");
        let err = TrainConfig::from_toml_str(&format!("{MINIMAL}[diffusion]\nloss = \"hybrid\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("learned_range"), "{err}");
        let err = TrainConfig::from_toml_str(&MINIMAL.replace("[32, 64]", "[32, 48]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("48"), "{err}");
    }
}
