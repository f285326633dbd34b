//! The config of `diffuse train-judge`: which images the classifier learns (an emoji folder's
//! concepts, some styles for training and another for testing; or an IDX folder's classes and
//! its own test split) and how.

use super::common::{config_dir, parse_toml, read_config, relative_to};
use super::vae::white;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The images a judge learns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JudgeData {
    /// An emoji folder: one class a concept, trained on `train_styles`, tested on `test_styles`.
    Emoji {
        path: PathBuf,
        train_styles: Vec<String>,
        test_styles: Vec<String>,
        #[serde(default = "white")]
        background: [u8; 3],
        image_size: usize,
        #[serde(default = "rgb_channels")]
        channels: usize,
    },
    /// An MNIST-layout IDX folder: its labels, its training and test splits, at its own size.
    Idx { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeOptimConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "grad_clip_default")]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    pub out_dir: PathBuf,
    #[serde(default = "checkpoint_every_default")]
    pub checkpoint_every: usize,
    #[serde(default = "log_every_default")]
    pub log_every: usize,
    /// Each training picture moved by up to this many pixels each way (its edge pixels
    /// repeated), a fresh draw every step: the judge learns a concept, not where it sits.
    #[serde(default)]
    pub augment_shift: usize,
    /// Each training picture mirrored left to right with probability 1/2.
    #[serde(default)]
    pub augment_flip: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeTrainConfig {
    pub data: JudgeData,
    #[serde(default)]
    pub model: JudgeModelConfig,
    pub train: JudgeOptimConfig,
}

/// The judge network's widths (`judge::Judge`): the two convolutions' channels and the
/// features; the public judges' [32, 64, 128] when left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeModelConfig {
    pub widths: [usize; 3],
}

impl Default for JudgeModelConfig {
    fn default() -> Self {
        Self {
            widths: crate::judge::JudgeShape::PUBLIC_WIDTHS,
        }
    }
}

impl JudgeTrainConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = parse_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `path`, its relative paths taken from its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut config = read_config(path, Self::from_toml_str)?;
        let base = config_dir(path);
        match &mut config.data {
            JudgeData::Emoji { path, .. } | JudgeData::Idx { path } => relative_to(base, path),
        }
        relative_to(base, &mut config.train.out_dir);
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JudgeTrainConfig always serialises")
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 || t.batch_size == 0 || t.checkpoint_every == 0 {
            return Err(Error::bad_value(
                "train.steps / train.batch_size / train.checkpoint_every",
                0,
                "positive integers",
            ));
        }
        if self.model.widths.contains(&0) {
            return Err(Error::bad_value(
                "model.widths",
                format!("{:?}", self.model.widths),
                "three positive channel counts",
            ));
        }
        if let JudgeData::Emoji {
            train_styles,
            test_styles,
            image_size,
            channels,
            ..
        } = &self.data
        {
            if train_styles.is_empty() || test_styles.is_empty() {
                return Err(Error::bad_value(
                    "data.train_styles / data.test_styles",
                    "[]",
                    "at least one style each",
                ));
            }
            if let Some(both) = train_styles.iter().find(|s| test_styles.contains(s)) {
                return Err(Error::Contradiction(format!(
                    "style {both} is in data.train_styles and data.test_styles; a held-out \
                     style must be held out"
                )));
            }
            if *image_size < 4 || image_size % 4 != 0 || !(*channels == 1 || *channels == 3) {
                return Err(Error::bad_value(
                    "data.image_size / data.channels",
                    format!("{image_size} / {channels}"),
                    "a multiple of 4 / 1 or 3",
                ));
            }
        }
        Ok(())
    }
}

fn rgb_channels() -> usize {
    3
}
fn grad_clip_default() -> f64 {
    1.0
}
fn checkpoint_every_default() -> usize {
    500
}
fn log_every_default() -> usize {
    50
}
