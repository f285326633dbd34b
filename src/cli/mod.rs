//! The command line: one file a subcommand; `main.rs` and `bin/txt2img.rs` only dispatch.

pub mod bench;
pub mod bench_ops;
pub mod convert;
pub mod eval;
pub mod eval_txt2img;
pub mod finetune;
pub mod sample;
pub mod sampler_args;
pub mod serve;
pub mod session_args;
pub mod single_file_args;
pub mod toy;
pub mod train;
pub mod train_judge;
pub mod train_vae;
pub mod txt2img;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "diffuse",
    version,
    about = "Latent diffusion in Rust on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Txt2img(Box<txt2img::Txt2imgArgs>),
    /// Toy problems that show the diffusion process at work.
    Toy(toy::ToyArgs),
    /// List the samplers and what each is for.
    Samplers,
    /// Time a model component with random weights of real shapes.
    Bench(bench::BenchArgs),
    /// Train a pixel-space DDPM, or a text-to-image latent model, from a TOML config.
    Train(train::TrainArgs),
    /// Train the latent autoencoder (KL VAE) of a small latent diffusion model.
    TrainVae(train_vae::TrainVaeArgs),
    /// Train a judge: a small classifier that reads generated images as a dataset's classes.
    TrainJudge(train_judge::TrainJudgeArgs),
    /// Draw images from a trained pixel-space model.
    Sample(sample::SampleArgs),
    /// Likelihood (bound and ODE) and judged sample quality of a trained pixel-space model.
    Eval(eval::EvalArgs),
    /// Prompt following of a text-to-image model trained on labelled datasets, by their judges.
    EvalTxt2img(eval_txt2img::EvalTxt2imgArgs),
    /// Fine-tune a Stable Diffusion U-Net on a folder of captioned images (full or LoRA).
    Finetune(Box<finetune::FinetuneArgs>),
    /// Serve models over HTTP: AUTOMATIC1111's API, OpenAI's images API and a web page.
    Serve(Box<serve::ServeArgs>),
    /// Convert a single-file checkpoint to a diffusers folder, or a folder to a single file.
    Convert(convert::ConvertArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Txt2img(args) => txt2img::run(*args),
        Command::Toy(args) => toy::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(args),
        Command::TrainVae(args) => train_vae::run(args),
        Command::TrainJudge(args) => train_judge::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Eval(args) => eval::run(args),
        Command::EvalTxt2img(args) => eval_txt2img::run(args),
        Command::Finetune(args) => finetune::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Samplers => {
            for entry in crate::sampler::registry::REGISTRY {
                println!("{:>9}  {}", entry.name, entry.guide);
            }
            Ok(())
        }
    }
}

/// A `--dtype`-style flag's value.
pub fn parse_dtype(flag: &str, name: &str) -> anyhow::Result<candle_core::DType> {
    use candle_core::DType;
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("{flag} = {other} is not allowed; expected f32, f16 or bf16"),
    })
}

/// A weights `--dtype` flag's value: f32, f16, bf16, or q8 (8-bit linear and convolution
/// weights, `ops::q8`, the rest held as bf16): the float dtype and whether to quantize.
pub fn parse_weights_dtype(flag: &str, name: &str) -> anyhow::Result<(candle_core::DType, bool)> {
    match name {
        "q8" => Ok((candle_core::DType::BF16, true)),
        other => match parse_dtype(flag, other) {
            Ok(dtype) => Ok((dtype, false)),
            Err(_) => {
                anyhow::bail!("{flag} = {other} is not allowed; expected f32, f16, bf16 or q8")
            }
        },
    }
}

/// A `--device` flag's value for generation (full-precision f32 on a GPU): `auto`, `cpu`,
/// `cuda` or `cuda:N`. `auto` is the first GPU when this binary has CUDA and the machine a GPU,
/// else the CPU; which one is printed.
pub fn parse_device(name: &str) -> anyhow::Result<candle_core::Device> {
    device_for(name, crate::ops::runtime::F32Matmul::Exact)
}

/// [`parse_device`] for training: f32 matrix products may use TF32 tensor cores.
pub fn parse_training_device(name: &str) -> anyhow::Result<candle_core::Device> {
    device_for(name, crate::ops::runtime::F32Matmul::Tf32)
}

fn device_for(
    name: &str,
    f32_matmul: crate::ops::runtime::F32Matmul,
) -> anyhow::Result<candle_core::Device> {
    use candle_core::Device;
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            let device = match cfg!(feature = "cuda") {
                true => device_for("cuda", f32_matmul).unwrap_or(Device::Cpu),
                false => Device::Cpu,
            };
            eprintln!(
                "device: {}",
                if device.is_cuda() { "cuda:0" } else { "cpu" }
            );
            return Ok(device);
        }
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!(
                "--device = {other} is not allowed; expected auto, cpu, cuda or cuda:N"
            ),
        },
    };
    if !cfg!(feature = "cuda") {
        anyhow::bail!(
            "--device = {name}: this binary was built without CUDA; rebuild with `cargo build --release --features cuda`"
        );
    }
    let device =
        Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device = {name}: {e}"))?;
    crate::ops::runtime::tune_cuda(&device, f32_matmul)
        .map_err(|e| anyhow::anyhow!("--device = {name}: {e}"))?;
    Ok(device)
}

/// Prints an error as one line and returns the process exit code.
pub fn report(error: anyhow::Error) -> std::process::ExitCode {
    let chain: Vec<String> = error.chain().map(|e| e.to_string()).collect();
    eprintln!("error: {}", chain.join(": "));
    std::process::ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flag_names_what_it_accepts() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(
            err.contains("--device = gpu") && err.contains("cuda:N"),
            "{err}"
        );
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
