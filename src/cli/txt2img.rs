//! `txt2img` (and `diffuse txt2img`): prompts to PNGs.

use super::sampler_args::SamplerArgs;
use super::single_file_args::SingleFileArgs;
use crate::image_io::save_png;
use crate::pipeline::concepts::{Concepts, CONCEPTS_FILE};
use crate::pipeline::request::GenerationRequest;
use crate::pipeline::txt2img::SizeConditioning;
use crate::pipeline::{LoadOptions, StableDiffusion};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct Txt2imgArgs {
    /// The prompt.
    pub prompt: Option<String>,
    /// A text file with one prompt per line (blank lines skipped).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// A diffusers pipeline folder, a single .safetensors checkpoint in the original layout
    /// (SD 1.x, 2.x, SDXL; inpainting too), a hub id (owner/name) or a short name: sd15, sd21,
    /// sd21-base, sd-turbo, sdxl, sdxl-turbo (default: the embedded model in weights/).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub single_file: SingleFileArgs,
    /// Download the `fp16` weight variant of a hub model.
    #[arg(long)]
    pub variant: Option<String>,
    /// What to steer away from (classifier-free guidance's unconditional prompt). Without it
    /// SDXL models guide against zeros (force_zeros_for_empty_prompt), others against "".
    #[arg(long)]
    pub negative: Option<String>,
    /// Classifier-free guidance scale; at or below 1 guidance is off (default 7.5, or the
    /// model preset's).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Guide only where the noise level sigma is in (LOW, HIGH] (Kynkäänniemi et al. 2024): more
    /// varied images for the same prompt following (default: everywhere, or the model preset's).
    #[arg(long, value_parser = parse_interval)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Guidance rescale phi (Lin et al. 2023), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Seed of the starting noise (default: a random one, printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// A safetensors file with tensor `latents` [N, 4, h, w]: diffusers' `latents=`.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Start from this image instead of noise (img2img; PNG, JPEG or WebP, resized to the size).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// With --init-image: inpaint where this mask is white (a grey-level image, binarised at
    /// half). An inpainting model is needed (a U-Net of 9 input channels); --latents is then
    /// the starting noise.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// With --init-image: how much of the schedule runs, in (0, 1]; higher departs further
    /// from the image.
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    /// Output PNG; numbered (name-1.png, ...) when there are several images.
    #[arg(long, short, default_value = "txt2img.png")]
    pub output: PathBuf,
    /// Weights dtype of the text encoder and U-Net: f32, f16, bf16 or q8. On a CPU, bf16 runs
    /// its products on AMX tiles or with AVX512_BF16 where the CPU has them (about half f32's
    /// time) and is held as f32 where it has neither. q8 holds linear and convolution weights as
    /// 8-bit integers with a scale per output channel (a quarter of f32's memory), quantized as
    /// they load (or read from a `diffuse convert --dtype q8` folder), products as bf16's.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A LoRA file to merge into the model, FILE or FILE:SCALE (repeatable): diffusers/PEFT
    /// layout (as `diffuse finetune` writes) or kohya's `lora_unet_...` layout.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// VAE dtype (f32 by default: f16 SD VAEs overflow to black images).
    #[arg(long, default_value = "f32")]
    pub vae_dtype: String,
    /// Decode with TAESD (a diffusers AutoencoderTiny folder or hub id: madebyollin/taesd for
    /// SD 1.x/2.x, madebyollin/taesdxl for SDXL) instead of the VAE: a fraction of the time,
    /// slightly softer pictures.
    #[arg(long, value_name = "DIR_OR_ID")]
    pub vae_decoder: Option<String>,
    /// SDXL: the size the image is to look as if cut from, W,H (default: the output size).
    #[arg(long, value_parser = parse_pair, value_name = "W,H")]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: where that crop starts, X,Y (default 0,0: an uncropped look).
    #[arg(long, value_parser = parse_pair, value_name = "X,Y")]
    pub crops_coords_top_left: Option<(usize, usize)>,
    /// SDXL: the size the image is to look made for, W,H (default: the output size).
    #[arg(long, value_parser = parse_pair, value_name = "W,H")]
    pub target_size: Option<(usize, usize)>,
    /// Where to run: auto (the GPU when this binary has CUDA and the machine a GPU, else the
    /// CPU), cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Generate even when the size and batch look too large for the memory available.
    #[arg(long)]
    pub no_memory_check: bool,
    /// Print what the model was trained to draw (the embedded model, or a model trained by
    /// `diffuse train`), each with its main caption; with a word, only the ones whose captions
    /// contain it. Nothing is generated.
    #[arg(long, value_name = "WORD", num_args = 0..=1, default_missing_value = "")]
    pub list_concepts: Option<String>,
}

/// What `--model` names, or the embedded default's folder.
fn model_spec(model: Option<&str>) -> anyhow::Result<String> {
    match model {
        Some(m) => Ok(m.to_string()),
        None => {
            eprintln!(
                "using the embedded default model (20 classes of digits and clothes at 32x32; \
                 --model sd15 or sd-turbo for real pictures)"
            );
            Ok(crate::embedded::model_dir()?.display().to_string())
        }
    }
}

fn prompts(args: &Txt2imgArgs) -> anyhow::Result<Vec<String>> {
    let list = match (&args.prompt, &args.prompts_file) {
        (Some(_), Some(_)) => bail!("give a prompt or --prompts-file, not both"),
        (Some(p), None) => vec![p.clone()],
        (None, Some(path)) => {
            let list: Vec<String> = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            anyhow::ensure!(
                !list.is_empty(),
                "{}: has no prompts; expected one prompt a line (blank lines are skipped)",
                path.display()
            );
            list
        }
        (None, None) => {
            bail!("no prompt: give one, e.g. txt2img \"a photo of a cat\", or --prompts-file")
        }
    };
    Ok(list)
}

fn numbered(output: &Path, index: usize, total: usize) -> PathBuf {
    if total == 1 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("image");
    output.with_file_name(format!("{stem}-{}.png", index + 1))
}

/// `A,B`: two whole numbers (a size W,H or a position X,Y).
pub fn parse_pair(text: &str) -> Result<(usize, usize), String> {
    text.split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .ok_or_else(|| {
            format!("\"{text}\" is not a pair; expected two whole numbers A,B such as 1024,1024")
        })
}

/// `LOW,HIGH` with 0 <= LOW < HIGH.
pub fn parse_interval(text: &str) -> Result<(f64, f64), String> {
    let parsed: Option<(f64, f64)> = text
        .split_once(',')
        .and_then(|(low, high)| Some((low.trim().parse().ok()?, high.trim().parse().ok()?)));
    match parsed {
        Some((low, high)) if low >= 0.0 && low < high => Ok((low, high)),
        _ => Err(format!(
            "\"{text}\" is not a noise interval; expected LOW,HIGH with 0 <= LOW < HIGH (sigmas, e.g. 0.3,5)"
        )),
    }
}

/// The library's request for these flags (files named by flags are read here: the request
/// holds their contents).
fn request(args: &Txt2imgArgs, prompts: Vec<String>) -> anyhow::Result<GenerationRequest> {
    let latents = match &args.latents {
        Some(path) => Some(
            candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .with_context(|| format!("reading {}", path.display()))?
                .remove("latents")
                .with_context(|| format!("{}: no tensor named `latents`", path.display()))?,
        ),
        None => None,
    };
    let init_image = match &args.init_image {
        Some(path) => Some(crate::image_io::decode_image(path)?.to_rgb8()),
        None => None,
    };
    let mask = match &args.mask {
        Some(path) => Some(crate::image_io::decode_image(path)?.to_luma8()),
        None => None,
    };
    let scheduler = match &args.sampler.scheduler_config {
        Some(path) => Some(crate::sampler::SchedulerConfig::from_file(path)?),
        None => None,
    };
    let sampler = match &args.sampler.sampler {
        Some(name) => Some(crate::sampler::SamplerKind::parse(name)?),
        None => None,
    };
    Ok(GenerationRequest {
        prompts,
        negative: args.negative.clone(),
        width: args.width,
        height: args.height,
        steps: args.sampler.steps,
        guidance: args.guidance,
        guidance_interval: args.guidance_interval,
        guidance_rescale: args.guidance_rescale,
        sampler,
        sampler_options: args.sampler.tuning.options(),
        scheduler,
        seed: args.seed,
        num_images: args.num_images,
        init_image,
        mask,
        strength: args.strength,
        latents,
        size_conditioning: SizeConditioning {
            original_size: args.original_size,
            crops_coords_top_left: args.crops_coords_top_left.unwrap_or((0, 0)),
            target_size: args.target_size,
        },
        memory_check: !args.no_memory_check,
    })
}

/// `--list-concepts [WORD]`: the model's caption sets, from its `concepts.json`.
fn list_concepts(model: Option<&str>, query: &str) -> anyhow::Result<()> {
    let spec = model_spec(model)?;
    let dir = Path::new(&spec);
    let Some(concepts) = Concepts::read(dir)? else {
        bail!(
            "{spec}: has no {CONCEPTS_FILE}, so what it knows is not listed (models trained \
             elsewhere know what their own training data held)"
        );
    };
    let found = concepts.search(query);
    let mut out = std::io::stdout().lock();
    for caption in &found {
        // A closed pipe (`| head`) ends the listing quietly.
        if std::io::Write::write_all(&mut out, format!("{caption}\n").as_bytes()).is_err() {
            return Ok(());
        }
    }
    eprintln!(
        "{} of the {} things this model was trained on{}",
        found.len(),
        concepts.concepts.len(),
        if query.is_empty() {
            String::new()
        } else {
            format!(" match \"{query}\"")
        }
    );
    Ok(())
}

/// Says so for each prompt whose naming words the model was never trained on.
fn warn_unknown(concepts: &Concepts, prompts: &[String], embedded: bool) {
    for prompt in prompts {
        if concepts.knows(prompt) {
            continue;
        }
        eprintln!(
            "warning: no word of \"{prompt}\" names anything this model was trained on ({} \
             things); it will draw one of those. `txt2img --list-concepts` lists them \
             (`--list-concepts WORD` searches){}",
            concepts.concepts.len(),
            if embedded {
                "; for real pictures use --model sd15"
            } else {
                ""
            }
        );
    }
}

pub fn run(args: Txt2imgArgs) -> anyhow::Result<()> {
    if let Some(query) = &args.list_concepts {
        return list_concepts(args.model.as_deref(), query);
    }
    // Check everything cheap before loading weights.
    let request = request(&args, prompts(&args)?)?;
    request.validate()?;
    let (dtype, q8) = super::parse_weights_dtype("--dtype", &args.dtype)?;
    let options = LoadOptions {
        dtype,
        q8,
        vae_dtype: super::parse_dtype("--vae-dtype", &args.vae_dtype)?,
        loras: args
            .loras
            .iter()
            .map(|arg| crate::model::lora::parse_lora_arg(arg))
            .collect::<crate::Result<_>>()?,
        device: super::parse_device(&args.device)?,
        vae_decoder: args.vae_decoder.clone(),
        preview_decoder: None,
    };
    for (path, _) in &options.loras {
        anyhow::ensure!(path.is_file(), "--lora {}: no such file", path.display());
    }
    crate::image_io::check_writable(&args.output)?;
    let fp16 = match args.variant.as_deref() {
        None => false,
        Some("fp16") => true,
        Some(other) => bail!("--variant = {other} is not allowed; expected fp16"),
    };
    let preset = match args.model.as_deref() {
        Some(model) => crate::hub::preset(model),
        None => Some(&crate::hub::EMBEDDED),
    };
    let single_file = args.single_file.options()?;
    let spec = model_spec(args.model.as_deref())?;
    let load_start = Instant::now();
    let (sd, recognised) = StableDiffusion::load_model(&spec, fp16, &single_file, options)?;
    let model_name = match &args.model {
        None => crate::hub::EMBEDDED.name.to_string(),
        Some(_) => sd.name(),
    };
    eprintln!(
        "loaded {}{} in {:.2} s",
        sd.root.display(),
        recognised.map_or(String::new(), |r| format!(" ({}, single file)", r.name())),
        load_start.elapsed().as_secs_f64()
    );
    if let Some(concepts) = Concepts::read(&sd.root)? {
        warn_unknown(&concepts, &request.prompts, args.model.is_none());
    }
    let generation = request.prepare(&sd, preset)?;
    let total_images = generation.total_images();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be set (the process already has one): Ctrl-C then ends the
        // process at once, which still leaves only whole PNGs behind.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let mut written = 0;
    let mut failed_writes = Vec::new();
    for p_index in 0..request.prompts.len() {
        let bar = ProgressBar::new(generation.steps_per_image() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}, {per_sec}]",
            )
            .expect("valid template"),
        );
        bar.set_message(generation.kind.cli_name());
        let mut on_step = |_: &crate::sampler::StepEvent| {
            bar.inc(1);
            if interrupted.load(Ordering::SeqCst) {
                candle_core::bail!("{INTERRUPTED}");
            }
            Ok(())
        };
        let generated = generation.run(&sd, p_index, &mut on_step);
        bar.finish_and_clear();
        let out = match generated {
            Err(_) if interrupted.load(Ordering::SeqCst) => {
                report_failed_writes(&failed_writes)?;
                bail!("interrupted by Ctrl-C: {written} of {total_images} images written (listed above)")
            }
            other => other?,
        };
        if out.prompt_truncated {
            eprintln!(
                "warning: the prompt is longer than {} tokens and was truncated",
                sd.tokenizer.max_length
            );
        }
        let parameters = generation.parameters(p_index, &model_name);
        for i in 0..out.images.dim(0)? {
            let path = numbered(&args.output, written + failed_writes.len(), total_images);
            let image = out.images.get(i)?;
            match save_png(&image, &path, Some(&parameters)) {
                Ok(()) => {
                    println!("{}", path.display());
                    written += 1;
                }
                Err(e) => failed_writes.push(rescue(&image, &path, &parameters, e)),
            }
        }
        let mean_step = out.step_times.iter().map(|d| d.as_secs_f64()).sum::<f64>()
            / out.step_times.len().max(1) as f64;
        eprintln!(
            "text encoding {:.3} s, {:.3} s per step (mean of {}), decoding {:.3} s, seed {}",
            out.text_time.as_secs_f64(),
            mean_step,
            out.step_times.len(),
            out.decode_time.as_secs_f64(),
            generation.seed(p_index)
        );
    }
    report_failed_writes(&failed_writes)
}

const INTERRUPTED: &str = "interrupted by Ctrl-C";

/// After `save_png` failed at `path` (a full disk, a folder that went away), writes the image
/// to the temporary folder instead so the computed picture is kept, and says where.
fn rescue(
    image: &candle_core::Tensor,
    path: &Path,
    parameters: &str,
    error: crate::Error,
) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "txt2img.png".into());
    let fallback =
        std::env::temp_dir().join(format!("diffuse-rescued-{}-{name}", std::process::id()));
    match save_png(image, &fallback, Some(parameters)) {
        Ok(()) => format!(
            "{error}; the image was saved to {} instead",
            fallback.display()
        ),
        Err(second) => format!(
            "{error}; saving it to {} failed too: {second}",
            fallback.display()
        ),
    }
}

fn report_failed_writes(failures: &[String]) -> anyhow::Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    bail!(
        "{} image(s) could not be written where asked:\n{}",
        failures.len(),
        failures.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::parse_interval;

    #[test]
    fn guidance_interval_is_two_ordered_sigmas() {
        assert_eq!(parse_interval("0.3, 5").unwrap(), (0.3, 5.0));
        for bad in ["5,0.3", "0.3", "a,b", "-1,2", "2,2"] {
            let message = parse_interval(bad).unwrap_err();
            assert!(message.contains("LOW,HIGH"), "{bad}: {message}");
        }
    }
}
