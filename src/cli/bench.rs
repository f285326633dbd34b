//! `diffuse bench`: times model components with random weights of real shapes (SD 1.5 by
//! default), so no download is needed.

use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::taesd::{TinyAutoencoder, TinyAutoencoderConfig};
use crate::model::text::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::{TextTimeConditioning, UNetConditioning};
use crate::model::vae::AutoencoderKL;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Component {
    /// One classifier-free-guidance U-Net step (batch 2, 77 tokens).
    Unet,
    /// One VAE decode.
    VaeDecode,
    /// One TAESD (AutoencoderTiny) decode, madebyollin/taesd's shape (or --config).
    TaesdDecode,
    /// One CLIP text-encoder call for a CFG pair of prompts (batch 2, 77 tokens).
    TextEncoder,
    /// One pixel-DDPM training step (forward, backward, AdamW, EMA) of a `diffuse train`
    /// config (configs/ddpm-mnist.toml by default) on random images.
    TrainPixel,
    /// The op kinds of that training step one at a time, at its first level's shape.
    TrainOps,
    /// One LoRA fine-tuning step (U-Net forward and backward, AdamW) of `diffuse finetune` at
    /// --size pixels, batch --batch (default 1), rank --lora-rank, on random latents and
    /// caption states, with random weights of SD 1.5's U-Net (or --config).
    FinetuneLora,
    /// A whole text-to-image call at --size with random weights of SD 1.5 (text encoder, U-Net,
    /// VAE; or of the diffusers folder --config): the prompt (and the empty prompt when guided)
    /// encoded, --steps DDIM steps with --guidance, one decode (TAESD with --vae-decoder taesd).
    Txt2img,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub component: Component,
    /// Image size in pixels (square).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// f32, f16, bf16 or q8 (as txt2img's --dtype).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A diffusers config.json to benchmark instead of SD 1.5's (train-pixel: a TOML training
    /// config; txt2img: a diffusers pipeline folder).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// train-pixel: the batch size (default: the config's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`), or auto.
    /// The CPU unless asked: a benchmark measures one named device, never whichever is found.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// finetune-lora: the adapters' rank.
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// txt2img: sampler steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// txt2img: classifier-free guidance scale; 1 or less runs one U-Net call a step (as
    /// sd-turbo does).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// txt2img: the VAE's (and TAESD's) dtype, as txt2img's --vae-dtype.
    #[arg(long, default_value = "f32")]
    pub vae_dtype: String,
    /// txt2img: `taesd` decodes with random weights of madebyollin/taesd's shape instead of the
    /// VAE.
    #[arg(long, value_parser = ["taesd"])]
    pub vae_decoder: Option<String>,
    /// unet, vae-decode, taesd-decode, text-encoder: also draw the weights in f32, run one step of
    /// an f32 model of the same weights and inputs, and print the relative L2 error of the
    /// `--dtype` model's output against it.
    #[arg(long)]
    pub error_against_f32: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// SD 1.5's U-Net (stable-diffusion-v1-5, unet/config.json); benches/pytorch_reference.py
/// builds its PyTorch counterpart from the same file.
pub const SD15_UNET: &str = include_str!("../../configs/sd15/unet.json");

/// SD 1.5's VAE (vae/config.json).
pub const SD15_VAE: &str = include_str!("../../configs/sd15/vae.json");

/// SD 1.5's text encoder, CLIP ViT-L/14's text model (text_encoder/config.json).
pub const SD15_TEXT_ENCODER: &str = include_str!("../../configs/sd15/text_encoder.json");

/// SD 1.5's noise schedule (scheduler/scheduler_config.json).
pub const SD15_SCHEDULER: &str = include_str!("../../configs/sd15/scheduler.json");

/// Random weights for the model that `build` makes, as plain tensors, and their count.
/// They are drawn into training variables and then handed over as tensors: a forward pass
/// over variables would record its whole graph for a backward pass.
fn random_weights<T, E: std::error::Error + Send + Sync + 'static>(
    dtype: DType,
    q8: bool,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T, E>,
) -> anyhow::Result<(VarBuilder<'static>, usize)> {
    let weights = random_tensors(dtype, device, build)?;
    let count = weights.count;
    Ok((weights.into_var_builder(dtype, q8, device), count))
}

/// The tensors of [`random_weights`].
struct RandomTensors {
    tensors: std::collections::HashMap<String, Tensor>,
    count: usize,
}

fn random_tensors<T, E: std::error::Error + Send + Sync + 'static>(
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T, E>,
) -> anyhow::Result<RandomTensors> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, dtype, device))?;
    let tensors: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("VarMap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    let count = tensors.values().map(|t| t.elem_count()).sum();
    Ok(RandomTensors { tensors, count })
}

impl RandomTensors {
    /// The tensors read in `dtype`; with `q8`, as `--dtype q8` loads a file (linear and
    /// convolution weights quantized).
    fn var_builder(&self, dtype: DType, q8: bool, device: &Device) -> VarBuilder<'static> {
        let tensors = self.tensors.clone();
        match q8 {
            true => VarBuilder::from_backend(
                Box::new(crate::weights::QuantizingBackend::wrapping(Box::new(
                    tensors,
                ))),
                dtype,
                device.clone(),
            ),
            false => VarBuilder::from_tensors(tensors, dtype, device),
        }
    }
}

impl RandomTensors {
    /// [`Self::var_builder`], handing each tensor over as it is read (q8 reads some twice): a
    /// layer that keeps its weight in another form (transposed, packed) then holds the only
    /// copy, as when it loads from a file, and the peak memory is the model's.
    fn into_var_builder(self, dtype: DType, q8: bool, device: &Device) -> VarBuilder<'static> {
        if q8 {
            return self.var_builder(dtype, q8, device);
        }
        let tensors = TakenTensors(std::sync::Mutex::new(self.tensors));
        VarBuilder::from_backend(Box::new(tensors), dtype, device.clone())
    }
}

/// Tensors that leave the map as the model reads them.
struct TakenTensors(std::sync::Mutex<std::collections::HashMap<String, Tensor>>);

impl candle_nn::var_builder::SimpleBackend for TakenTensors {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!("{name}: {:?}, expected {shape:?}", tensor.shape())
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.0.lock().expect("tensor map lock").remove(name);
        match tensor {
            Some(tensor) => tensor.to_device(device)?.to_dtype(dtype),
            None => candle_core::bail!("no tensor {name} (or read twice)"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.lock().expect("tensor map lock").contains_key(name)
    }
}

/// |got - want| / |want| over all elements (L2 norms), in f64.
fn relative_l2(got: &Tensor, want: &Tensor) -> candle_core::Result<f64> {
    let want = want.to_dtype(DType::F64)?;
    let diff = (got.to_dtype(DType::F64)? - &want)?;
    let norm = |t: &Tensor| -> candle_core::Result<f64> {
        Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
    };
    Ok(norm(&diff)? / norm(&want)?)
}

/// A memory figure of this process from `/proc/self/status` in MiB (0 where there is none).
fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Starts the peak-memory count afresh from what is resident now (Linux: writing 5 to
/// `clear_refs` resets `VmHWM`), so a benchmark's peak leaves out the building of its random
/// weights. Elsewhere the peak keeps counting from the start.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The MNIST training config, so the training benchmark needs no files.
const DDPM_MNIST: &str = include_str!("../../configs/ddpm-mnist.toml");

/// Times `runs` calls of `step` after one warm-up call and prints median, min, max and the
/// peak resident memory while they ran (the model's weights included, their building not);
/// with `json` (the case's own fields), also those figures added to it as one JSON line.
fn time_runs(
    label: &str,
    runs: usize,
    json: Option<serde_json::Value>,
    step: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    reset_peak_rss();
    let resident_before = status_mb("VmRSS:");
    step()?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    let peak = peak_rss_mb();
    println!(
        "{label}: median {median:.3} s, min {min:.3} s, max {max:.3} s over {runs} runs, peak RSS {peak:.0} MiB ({resident_before:.0} MiB before the first run)"
    );
    let (cpu, features) = crate::ops::runtime::cpu_description();
    eprintln!("cpu: {cpu} ({})", features.join(" "));
    if let Some(serde_json::Value::Object(mut fields)) = json {
        fields.insert("cpu".into(), cpu.into());
        fields.insert("cpu_features".into(), features.into());
        fields.insert("runs".into(), times.into());
        fields.insert("median_s".into(), median.into());
        fields.insert("min_s".into(), min.into());
        fields.insert("max_s".into(), max.into());
        fields.insert("peak_rss_mb".into(), peak.into());
        fields.insert("rss_before_runs_mb".into(), resident_before.into());
        println!("{}", serde_json::Value::Object(fields));
    }
    Ok(())
}

/// The training config of `--config` (configs/ddpm-mnist.toml by default) with `--batch`.
fn pixel_config(args: &BenchArgs) -> anyhow::Result<crate::train::config::TrainConfig> {
    use crate::train::config::TrainConfig;
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::from_toml_str(DDPM_MNIST)?,
    };
    if let Some(batch) = args.batch {
        anyhow::ensure!(batch > 0, "--batch = 0 is not allowed; expected at least 1");
        config.train.batch_size = batch;
    }
    Ok(config)
}

/// One training step of the pixel DDPM on random 8-bit images of the config's shape.
fn bench_train_pixel(args: &BenchArgs) -> anyhow::Result<()> {
    use crate::data::idx::LabelledImages;
    use crate::train::pixel::PixelTrainer;
    use rand::Rng;
    let config = pixel_config(args)?;
    let size = config.model.image_size;
    let count = 256;
    let mut rng = crate::sampler::SeededNoise::new(0);
    let images = LabelledImages {
        pixels: (0..count * size * size * config.model.channels)
            .map(|_| rng.rng().random::<u8>())
            .collect(),
        labels: (0..count)
            .map(|i| (i % config.model.num_classes.unwrap_or(1)) as u16)
            .collect(),
        height: size,
        width: size,
    };
    let batch = config.train.batch_size;
    let mut trainer = PixelTrainer::new(config, &super::parse_training_device(&args.device)?)?;
    let params = trainer.parameter_count();
    eprintln!(
        "pixel DDPM training step: {:.2} M parameters, batch {batch} of {size}x{size}",
        params as f64 / 1e6
    );
    let json = serde_json::json!({
        "component": "TrainPixel",
        "size": size,
        "batch": batch,
        "dtype": "f32",
        "parameters": params,
    });
    time_runs(
        &format!("TrainPixel batch {batch} {size}x{size} f32"),
        args.runs,
        args.json.then_some(json),
        &mut || {
            trainer.train_step(&images)?;
            Ok(())
        },
    )
}

/// One LoRA fine-tuning step on random data. The random U-Net weights go through a temporary
/// safetensors file, since the trainer loads its base weights from one as `finetune` does.
fn bench_finetune_lora(args: &BenchArgs) -> anyhow::Result<()> {
    use crate::train::finetune::{FinetuneSettings, TrainingData, UnetTrainer};
    let device = super::parse_training_device(&args.device)?;
    let batch = args.batch.unwrap_or(1);
    anyhow::ensure!(batch > 0, "--batch = 0 is not allowed; expected at least 1");
    let config_text = match &args.config {
        Some(path) => std::fs::read_to_string(path)?,
        None => SD15_UNET.to_string(),
    };
    let config: UNetConfig = serde_json::from_str(&config_text)?;
    let context_dim = config.cross_attention_dim.unwrap_or(768);
    let channels = config.in_channels;
    let build_start = Instant::now();
    let dir = std::env::temp_dir().join(format!("diffuse-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weights = dir.join("unet.safetensors");
    {
        let varmap = VarMap::new();
        UNet2DConditionModel::new(
            config.clone(),
            VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &device),
        )?;
        varmap.save(&weights)?;
    }
    let settings = FinetuneSettings {
        resolution: args.size as u32,
        lora_rank: Some(args.lora_rank),
        learning_rate: 1e-4,
        ..Default::default()
    };
    let schedule = crate::diffusion::schedule::NoiseSchedule::new(
        &crate::diffusion::schedule::BetaSchedule::ScaledLinear {
            beta_start: 0.00085,
            beta_end: 0.012,
        },
        1000,
        false,
    )?;
    let trainer = UnetTrainer::new(
        config,
        &weights,
        settings,
        schedule,
        crate::diffusion::schedule::PredictionType::Epsilon,
        &device,
    );
    std::fs::remove_dir_all(&dir).ok();
    let mut trainer = trainer?;
    let latent = args.size / 8;
    let data = TrainingData {
        latents: Tensor::randn(0f32, 1., (batch, channels, latent, latent), &device)?,
        latents_flipped: None,
        text: Tensor::randn(0f32, 1., (batch, 77, context_dim), &device)?,
    };
    let params = trainer.trainable_parameters();
    eprintln!(
        "LoRA fine-tuning step at {size}x{size}, batch {batch}, rank {}: {:.2} M trainable parameters, built in {:.1} s",
        args.lora_rank,
        params as f64 / 1e6,
        build_start.elapsed().as_secs_f64(),
        size = args.size
    );
    let json = serde_json::json!({
        "component": "FinetuneLora",
        "size": args.size,
        "batch": batch,
        "lora_rank": args.lora_rank,
        "dtype": "f32",
        "trainable_parameters": params,
    });
    time_runs(
        &format!(
            "FinetuneLora batch {batch} {}x{} rank {} f32",
            args.size, args.size, args.lora_rank
        ),
        args.runs,
        args.json.then_some(json),
        &mut || {
            trainer.train_step(&data)?;
            device.synchronize()?;
            Ok(())
        },
    )
}

/// The dtype the weights are held in, as the pipeline holds them (`gemm_bf16::weight_dtype`),
/// saying so when it is not the one asked for.
fn held_dtype(requested: DType, device: &Device) -> DType {
    let held = crate::ops::gemm_bf16::weight_dtype(requested, device);
    if held != requested {
        eprintln!(
            "{requested:?} weights are held as {held:?}: this CPU has no AVX512_BF16, and every \
             {requested:?} product would widen to {held:?}"
        );
    }
    held
}

/// A whole txt2img call with random SD 1.5 weights: the time of everything a user waits for
/// after loading, and the peak memory beside the weights' size.
fn bench_txt2img(args: &BenchArgs) -> anyhow::Result<()> {
    use crate::pipeline::txt2img::{txt2img, Txt2ImgRequest};
    use crate::pipeline::{LoadOptions, StableDiffusion};
    use crate::sampler::{build_sampler, SamplerKind, SamplerOptions, SchedulerConfig};
    let device = super::parse_device(&args.device)?;
    let (dtype, q8) = super::parse_weights_dtype("--dtype", &args.dtype)?;
    let dtype = held_dtype(dtype, &device);
    anyhow::ensure!(
        args.steps > 0,
        "--steps = 0 is not allowed; expected at least 1"
    );
    // --config: a diffusers pipeline folder (or a folder of `<component>.json` files, as
    // configs/sdxl/) whose configs (and tokenizer) replace SD 1.5's.
    let folder = args.config.as_deref();
    let config_path = |component: &str, file: &str| -> Option<PathBuf> {
        let dir = folder?;
        let nested = dir.join(component).join(file);
        Some(if nested.exists() {
            nested
        } else {
            dir.join(format!("{component}.json"))
        })
    };
    let read = |component: &str, file: &str, default: &str| -> anyhow::Result<String> {
        match config_path(component, file) {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display())),
            None => Ok(default.to_string()),
        }
    };
    let tokenizer_dir = match folder {
        Some(dir) if dir.join("tokenizer").is_dir() => dir.join("tokenizer"),
        _ => crate::embedded::model_dir()?.join("tokenizer"),
    };
    // SDXL shapes: a second text encoder with its projection.
    let text_config_2: Option<ClipTextConfig> = match config_path("text_encoder_2", "config.json") {
        Some(path) if path.exists() => Some(serde_json::from_str(&read(
            "text_encoder_2",
            "config.json",
            "",
        )?)?),
        _ => None,
    };
    let build_start = Instant::now();
    let text_config: ClipTextConfig =
        serde_json::from_str(&read("text_encoder", "config.json", SD15_TEXT_ENCODER)?)?;
    let (vb, text_params) = random_weights(dtype, q8, &device, |vb| {
        ClipTextModel::new(text_config.clone(), vb)
    })?;
    let text_encoder = ClipTextModel::new(text_config, vb)?;
    let unet_config: UNetConfig = serde_json::from_str(&read("unet", "config.json", SD15_UNET)?)?;
    let (vb, unet_params) = random_weights(dtype, q8, &device, |vb| {
        UNet2DConditionModel::new(unet_config.clone(), vb)
    })?;
    let unet = UNet2DConditionModel::new(unet_config, vb)?;
    // The VAE in --vae-dtype (f32 by default, whatever --dtype says), as txt2img loads it.
    let vae_dtype = held_dtype(super::parse_dtype("--vae-dtype", &args.vae_dtype)?, &device);
    let vae_config: VaeConfig = serde_json::from_str(&read("vae", "config.json", SD15_VAE)?)?;
    let (vb, vae_params) = random_weights(vae_dtype, false, &device, |vb| {
        AutoencoderKL::new(vae_config.clone(), vb)
    })?;
    let vae = AutoencoderKL::new(vae_config, vb)?;
    let (tiny_vae, tiny_params) = match args.vae_decoder.as_deref() {
        Some(_) => {
            let config: TinyAutoencoderConfig = serde_json::from_str("{}")?;
            let (vb, params) = random_weights(vae_dtype, false, &device, |vb| {
                TinyAutoencoder::new(&config, vb)
            })?;
            (Some(TinyAutoencoder::new(&config, vb)?), params)
        }
        None => (None, 0),
    };
    let (text_encoder_2, text_params_2) = match text_config_2 {
        Some(config) => {
            let projection = config.projection_dim.unwrap_or(config.hidden_size);
            let hidden = config.hidden_size;
            let (vb, params) = random_weights(dtype, q8, &device, |vb| {
                // Made first so the encoder finds it, as in a CLIPTextModelWithProjection file.
                vb.get_with_hints(
                    (projection, hidden),
                    "text_projection.weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?;
                ClipTextModel::new(config.clone(), vb)
            })?;
            (Some(ClipTextModel::new(config, vb)?), params)
        }
        None => (None, 0),
    };
    let text_params = text_params + text_params_2;
    let scheduler = read("scheduler", "scheduler_config.json", SD15_SCHEDULER)?;
    let xl = text_encoder_2.is_some();
    let tokenizer = crate::tokenizer::ClipTokenizer::from_dir(&tokenizer_dir)?;
    let sd = StableDiffusion {
        root: PathBuf::from("random weights"),
        kind: if xl {
            crate::pipeline::PipelineKind::StableDiffusionXl
        } else {
            crate::pipeline::PipelineKind::StableDiffusion
        },
        tokenizer_2: xl.then(|| tokenizer.clone()),
        tokenizer,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt: xl,
        unet,
        vae,
        tiny_vae_for_images: tiny_vae.is_some(),
        tiny_vae,
        scheduler: SchedulerConfig::from_json_str(&scheduler)?,
        options: LoadOptions {
            dtype,
            q8,
            vae_dtype,
            device: device.clone(),
            ..Default::default()
        },
    };
    let sampler = build_sampler(
        SamplerKind::Ddim,
        &sd.scheduler,
        &SamplerOptions::default(),
        args.steps,
    )?;
    let mut request = Txt2ImgRequest::new(
        "a photograph of an astronaut riding a horse",
        args.size,
        args.size,
    );
    request.guidance = args.guidance;
    // q8: about a byte a weight (norms, biases and embeddings, a few percent, are bf16).
    let held_bytes = if q8 { 1 } else { dtype.size_in_bytes() };
    let weights_mb = ((text_params + unet_params) * held_bytes
        + (vae_params + tiny_params) * vae_dtype.size_in_bytes()) as f64
        / (1024.0 * 1024.0);
    eprintln!(
        "txt2img at {size}x{size}, {} DDIM steps, guidance {}{}: {:.0} MiB of weights, built in {:.1} s",
        args.steps,
        args.guidance,
        if sd.tiny_vae.is_some() { ", TAESD decode" } else { "" },
        weights_mb,
        build_start.elapsed().as_secs_f64(),
        size = args.size
    );
    let json = serde_json::json!({
        "component": "Txt2img",
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "vae_decoder": args.vae_decoder.as_deref().unwrap_or("vae"),
        "dtype": args.dtype,
        "parameters": text_params + unet_params + vae_params + tiny_params,
        "weights_mb": weights_mb,
    });
    time_runs(
        &format!(
            "Txt2img {}x{} {} steps {}",
            args.size, args.size, args.steps, args.dtype
        ),
        args.runs,
        args.json.then_some(json),
        &mut || {
            txt2img(&sd, sampler.as_ref(), &request, &mut |_| Ok(()))?;
            device.synchronize()?;
            Ok(())
        },
    )
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs >= 1,
        "--runs = 0 is not allowed; expected at least 1"
    );
    match args.component {
        Component::TrainPixel => return bench_train_pixel(&args),
        Component::TrainOps => {
            let device = super::parse_training_device(&args.device)?;
            return super::bench_ops::run(&pixel_config(&args)?, &device, args.runs, args.json);
        }
        Component::Unet
        | Component::VaeDecode
        | Component::TaesdDecode
        | Component::TextEncoder
        | Component::FinetuneLora
        | Component::Txt2img => {}
    }
    anyhow::ensure!(
        args.size >= 8 && args.size.is_multiple_of(8),
        "--size = {} is not allowed; expected a positive multiple of 8",
        args.size
    );
    match args.component {
        Component::FinetuneLora => return bench_finetune_lora(&args),
        Component::Txt2img => return bench_txt2img(&args),
        _ => {}
    }
    let device = super::parse_device(&args.device)?;
    let (dtype, q8) = super::parse_weights_dtype("--dtype", &args.dtype)?;
    let dtype = held_dtype(dtype, &device);
    let config_text = match &args.config {
        Some(path) => std::fs::read_to_string(path)?,
        None => match args.component {
            Component::Unet => SD15_UNET.to_string(),
            Component::VaeDecode => SD15_VAE.to_string(),
            // madebyollin/taesd's config is AutoencoderTiny's defaults.
            Component::TaesdDecode => "{}".to_string(),
            Component::TextEncoder => SD15_TEXT_ENCODER.to_string(),
            _ => unreachable!("handled above"),
        },
    };
    let build_start = Instant::now();
    let latent = args.size / 8;
    type Step = Box<dyn FnMut() -> candle_core::Result<Tensor>>;
    // The component built from a VarBuilder, with its inputs drawn once, as a step to time.
    let make_step: Box<dyn Fn(VarBuilder) -> crate::Result<Step>> = match args.component {
        Component::Unet => {
            let config: UNetConfig = serde_json::from_str(&config_text)?;
            let context_dim = config.cross_attention_dim.unwrap_or(768);
            let channels = config.in_channels;
            // SDXL-style U-Nets also take a pooled text embedding and six size/crop ids.
            let pooled_dim = match (
                config.addition_time_embed_dim,
                config.projection_class_embeddings_input_dim,
            ) {
                (Some(time_dim), Some(input_dim)) => Some(input_dim - 6 * time_dim),
                _ => None,
            };
            let x =
                Tensor::randn(0f32, 1., (2, channels, latent, latent), &device)?.to_dtype(dtype)?;
            let context =
                Tensor::randn(0f32, 1., (2, 77, context_dim), &device)?.to_dtype(dtype)?;
            let t = Tensor::new(&[500f32, 500.], &device)?;
            let text_time = match pooled_dim {
                Some(pooled_dim) => {
                    let size = args.size as f32;
                    Some(TextTimeConditioning {
                        text_embeds: Tensor::randn(0f32, 1., (2, pooled_dim), &device)?
                            .to_dtype(dtype)?,
                        time_ids: Tensor::new(&[[size, size, 0., 0., size, size]; 2], &device)?,
                    })
                }
                None => None,
            };
            let conditioning = UNetConditioning {
                context: Some(context),
                text_time,
                class_labels: None,
            };
            Box::new(move |vb| {
                let unet = UNet2DConditionModel::new(config.clone(), vb)?;
                let (x, t, conditioning) = (x.clone(), t.clone(), conditioning.clone());
                Ok(Box::new(move || unet.forward(&x, &t, &conditioning)) as Step)
            })
        }
        Component::VaeDecode => {
            let config: VaeConfig = serde_json::from_str(&config_text)?;
            let channels = config.latent_channels;
            let z =
                Tensor::randn(0f32, 1., (1, channels, latent, latent), &device)?.to_dtype(dtype)?;
            Box::new(move |vb| {
                let vae = AutoencoderKL::new(config.clone(), vb)?;
                let z = z.clone();
                Ok(Box::new(move || vae.decode(&z)) as Step)
            })
        }
        Component::TaesdDecode => {
            let config: TinyAutoencoderConfig = serde_json::from_str(&config_text)?;
            let channels = config.latent_channels;
            let latent = args.size / config.scale_factor();
            let z =
                Tensor::randn(0f32, 1., (1, channels, latent, latent), &device)?.to_dtype(dtype)?;
            Box::new(move |vb| {
                let taesd = TinyAutoencoder::new(&config, vb)?;
                let z = z.clone();
                Ok(Box::new(move || taesd.decode(&z).map_err(candle_core::Error::wrap)) as Step)
            })
        }
        Component::TextEncoder => {
            let config: ClipTextConfig = serde_json::from_str(&config_text)?;
            let ids: Vec<u32> = (0..2 * config.max_position_embeddings)
                .map(|i| (i * 7919 % config.vocab_size) as u32)
                .collect();
            let ids = Tensor::from_vec(ids, (2, config.max_position_embeddings), &device)?;
            Box::new(move |vb| {
                let encoder = ClipTextModel::new(config.clone(), vb)?;
                let ids = ids.clone();
                Ok(Box::new(move || encoder.forward(&ids)) as Step)
            })
        }
        _ => unreachable!("handled above"),
    };
    // Against f32: the weights drawn in f32, and one output of each model compared.
    let draw_dtype = if args.error_against_f32 {
        DType::F32
    } else {
        dtype
    };
    let weights = random_tensors(draw_dtype, &device, |vb| make_step(vb).map(|_| ()))?;
    let params = weights.count;
    let error_against_f32 = match args.error_against_f32 {
        true => {
            let want = make_step(weights.var_builder(DType::F32, false, &device))?()?;
            let got = make_step(weights.var_builder(dtype, q8, &device))?()?;
            let error = relative_l2(&got, &want)?;
            eprintln!("output against f32 of the same weights: relative L2 error {error:.5}");
            Some(error)
        }
        false => None,
    };
    let mut step = make_step(weights.into_var_builder(dtype, q8, &device))?;
    eprintln!(
        "{:?} at {size}x{size}: {:.1} M parameters, built in {:.1} s",
        args.component,
        params as f64 / 1e6,
        build_start.elapsed().as_secs_f64(),
        size = args.size
    );
    let json = serde_json::json!({
        "component": format!("{:?}", args.component),
        "size": args.size,
        "dtype": args.dtype,
        "parameters": params,
        "relative_error_against_f32": error_against_f32,
    });
    time_runs(
        &match args.component {
            Component::TextEncoder => format!("TextEncoder 2x77 tokens {}", args.dtype),
            component => format!("{component:?} {}x{} {}", args.size, args.size, args.dtype),
        },
        args.runs,
        args.json.then_some(json),
        &mut || {
            step()?;
            // GPU kernels run asynchronously: the time counts only once they have finished.
            device.synchronize()?;
            Ok(())
        },
    )
}
