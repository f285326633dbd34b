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
    /// q8: write a diffusers folder whose text encoders' and U-Net's linear and convolution
    /// weights are 8-bit (i8 with an f32 scale per output channel), as `--dtype q8` quantizes
    /// them while loading; the input must be a folder and the output a new folder.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let converted = if let Some(dtype) = &args.dtype {
        anyhow::ensure!(
            dtype == "q8",
            "--dtype = {dtype} is not allowed; expected q8 (the float dtypes are converted as they load)"
        );
        anyhow::ensure!(
            args.input.is_dir(),
            "--dtype q8 quantizes a diffusers folder; {} is not one (convert it to a folder first)",
            args.input.display()
        );
        crate::pipeline::convert::quantize_folder(&args.input, &args.output)?
    } else if args.input.is_dir() {
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
