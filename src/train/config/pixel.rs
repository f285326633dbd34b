//! The config of a pixel-space DDPM run (`[model] autoencoder = "none"`): the data, the model
//! and diffusion sections a pixel model is described by, and the `[train]` section.

use super::common::{config_dir, parse_toml, read_config, relative_to, OptimConfig};
use crate::diffusion::config::DiffusionConfig;
use crate::error::{Error, Result};
use crate::pipeline::pixel_config::{PixelModel, PixelModelConfig};
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: PixelModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    pub train: OptimConfig,
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

    /// The model the config trains: its network and diffusion process.
    pub fn description(&self) -> PixelModel {
        PixelModel {
            model: self.model.clone(),
            diffusion: self.diffusion.clone(),
        }
    }

    /// Settings that parse but cannot be honoured together.
    pub fn validate(&self) -> Result<()> {
        self.description().validate()?;
        let t = &self.train;
        t.validate_schedule_and_weighting()?;
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
        Ok(())
    }
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
        let weighted = MINIMAL.replace("steps = 10", "steps = 10\nmin_snr_gamma = 5.0");
        let weighted = TrainConfig::from_toml_str(&weighted).unwrap();
        assert_eq!(weighted.train.min_snr_gamma, Some(5.0));
        let again = TrainConfig::from_toml_str(&weighted.to_toml()).unwrap();
        assert_eq!(again, weighted);
        let cooled = MINIMAL.replace(
            "steps = 10",
            "steps = 10\ndecay_steps = 4\nfinal_learning_rate = 1e-5",
        );
        let cooled = TrainConfig::from_toml_str(&cooled).unwrap();
        assert_eq!(cooled.train.learning_rate_schedule().at(9), 1e-5);
        let again = TrainConfig::from_toml_str(&cooled.to_toml()).unwrap();
        assert_eq!(again, cooled);
        let unet = config.description().unet_config().unwrap();
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
        for gamma in ["0.0", "-1.0", "inf"] {
            let bad = MINIMAL.replace(
                "steps = 10",
                &format!("steps = 10\nmin_snr_gamma = {gamma}"),
            );
            let err = TrainConfig::from_toml_str(&bad).unwrap_err().to_string();
            assert!(err.contains("train.min_snr_gamma"), "{err}");
        }
        for (key, line) in [
            ("train.decay_steps", "decay_steps = 11"),
            ("train.final_learning_rate", "final_learning_rate = 1.0"),
            ("train.final_learning_rate", "final_learning_rate = -1e-5"),
        ] {
            let bad = MINIMAL.replace("steps = 10", &format!("steps = 10\n{line}"));
            let err = TrainConfig::from_toml_str(&bad).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
