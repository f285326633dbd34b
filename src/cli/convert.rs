//! `diffuse convert`: a single-file checkpoint to a diffusers folder, or a folder to a single
//! file in the original layout.

use crate::pipeline::convert::{folder_to_single_file, single_file_to_folder};
use crate::pipeline::source::SingleFileOptions;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// A single .safetensors checkpoint (original layout) or a diffusers pipeline folder.
    pub input: PathBuf,
    /// Where to write: a folder for a single-file input, a .safetensors file for a folder. It
    /// must not exist yet.
    pub output: PathBuf,
    /// Single file to folder: take configs, tokenizers and scheduler from this diffusers
    /// folder instead of the built-in ones.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Single file to folder: the VAE to write instead of the file's (folder or file).
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// Single file to folder: the scheduler's prediction type (epsilon or v_prediction).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let converted = if args.input.is_dir() {
        anyhow::ensure!(
            args.config.is_none() && args.vae.is_none() && args.prediction_type.is_none(),
            "--config, --vae and --prediction-type apply to a single-file input; {} is a folder",
            args.input.display()
        );
        folder_to_single_file(&args.input, &args.output)?
    } else {
        let options = SingleFileOptions {
            config_dir: args.config.clone(),
            vae: args.vae.clone(),
            prediction_type: args
                .prediction_type
                .as_deref()
                .map(crate::schedule::PredictionType::parse)
                .transpose()?,
        };
        single_file_to_folder(&args.input, &options, &args.output)?
    };
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB{})",
        args.output.display(),
        converted.tensors,
        converted.bytes as f64 / 1e6,
        converted
            .recognised
            .as_ref()
            .map_or(String::new(), |r| format!("; read as {r}"))
    );
    if args.json {
        println!("{}", serde_json::to_string(&converted)?);
    }
    Ok(())
}
