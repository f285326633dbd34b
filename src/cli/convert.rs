//! `diffuse convert`: a single-file checkpoint to a diffusers folder, or a folder to a single
//! file in the original layout.

use super::single_file_args::SingleFileArgs;
use crate::pipeline::convert::{folder_to_single_file, single_file_to_folder};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// A single .safetensors checkpoint (original layout) or a diffusers pipeline folder.
    pub input: PathBuf,
    /// Where to write: a folder for a single-file input, a .safetensors file for a folder. It
    /// must not exist yet.
    pub output: PathBuf,
    /// Single file to folder only: how to read it.
    #[command(flatten)]
    pub single_file: SingleFileArgs,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let converted = if args.input.is_dir() {
        anyhow::ensure!(
            !args.single_file.given(),
            "--config, --vae and --prediction-type apply to a single-file input; {} is a folder",
            args.input.display()
        );
        folder_to_single_file(&args.input, &args.output)?
    } else {
        let options = args.single_file.options()?;
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
