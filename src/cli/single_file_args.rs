//! The flags that say how to read a single-file checkpoint, shared by `txt2img` and `convert`.

use crate::pipeline::source::SingleFileOptions;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Args)]
pub struct SingleFileArgs {
    /// With a single-file model: a diffusers folder whose configs, tokenizers and scheduler to
    /// use instead of the built-in ones of the recognised architecture.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// A VAE to use instead of the model's: a diffusers vae/ folder or a .safetensors file.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// What the U-Net predicts: epsilon or v_prediction (default: the model's scheduler config;
    /// single SD 2.x files are taken as v_prediction, as diffusers does).
    #[arg(long)]
    pub prediction_type: Option<String>,
}

impl SingleFileArgs {
    /// Whether any of these flags was given.
    pub fn given(&self) -> bool {
        self.config.is_some() || self.vae.is_some() || self.prediction_type.is_some()
    }

    /// The library's options for these flags.
    pub fn options(&self) -> crate::Result<SingleFileOptions> {
        Ok(SingleFileOptions {
            config_dir: self.config.clone(),
            vae: self.vae.clone(),
            prediction_type: self
                .prediction_type
                .as_deref()
                .map(crate::diffusion::schedule::PredictionType::parse)
                .transpose()?,
        })
    }
}
