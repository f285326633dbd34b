//! `diffuse eval-txt2img`: how well a text-to-image model trained on labelled datasets (the
//! embedded default) follows its class captions, scored by each dataset's public judge: the
//! fraction drawn as the prompted class, the predicted-class histogram, and the Fréchet distance
//! of judge features to the test set beside the judge's floor for the same sample count.

use crate::data::captions::{ClassCaptions, EXTRA_TEMPLATES};
use crate::data::idx::pad_to;
use crate::data::idx::{LabelledImages, Split};
use crate::judge::{fd_floor, shipped_classes, shipped_judge};
use crate::judge::{frechet_distance, FeatureStats, Judge};
use crate::pipeline::pixel::class_columns_grid;
use crate::pipeline::txt2img::{sample_prompts, PromptGuidance};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::sampler::{build_sampler, SamplerKind, SamplerOptions};
use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct EvalTxt2imgArgs {
    /// The model folder (default: the embedded model in weights/).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The datasets whose classes the model was trained on, in training order (their classes
    /// are numbered on: MNIST 0-9, then Fashion-MNIST 10-19).
    #[arg(long = "dataset", default_values_t = ["mnist".to_string(), "fashion-mnist".to_string()])]
    pub datasets: Vec<String>,
    /// Images per class caption.
    #[arg(long, default_value_t = 100)]
    pub per_prompt: usize,
    /// Classifier-free guidance scale (the embedded model's card: 3, with --guidance-interval
    /// 0.3,2).
    #[arg(long, default_value_t = 3.0)]
    pub guidance: f64,
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Guide only where the noise level sigma is in (LOW, HIGH] (Kynkäänniemi et al. 2024), e.g.
    /// `0.3,5`; default everywhere.
    #[arg(long, value_parser = super::txt2img::parse_interval)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Also judge the VAE's reconstructions of as many test images (roughly the Fréchet distance
    /// a model drawing through this VAE can reach): the folder holding each dataset's IDX files.
    #[arg(long)]
    pub reconstruction_data: Option<PathBuf>,
    /// Also write a grid of the first 8 images of every class, one class a column.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Images from the pipeline ([0, 1], padded) as the judge takes them: [-1, 1], the centre
/// 28x28.
pub fn judge_view(images: &Tensor) -> anyhow::Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    anyhow::ensure!(
        h >= 28 && w >= 28,
        "the judges score 28x28 images; these are {h}x{w}"
    );
    Ok(images
        .narrow(2, (h - 28) / 2, 28)?
        .narrow(3, (w - 28) / 2, 28)?
        .affine(2.0, -1.0)?)
}

/// The Fréchet distance between the judge features of the VAE's reconstructions (posterior
/// means) of the first `n` test images and the test set.
fn reconstruction_fd(
    sd: &StableDiffusion,
    data_dir: &Path,
    judge: &Judge,
    reference: &FeatureStats,
    n: usize,
) -> anyhow::Result<f64> {
    let data = LabelledImages::load(data_dir, Split::Test)?;
    let size = sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor();
    let mut features = Vec::new();
    for start in (0..n.min(data.len())).step_by(100) {
        let indices: Vec<usize> = (start..n.min(data.len()).min(start + 100)).collect();
        let images = pad_to(&data.batch(&indices, &Device::Cpu)?, size)?.affine(0.5, 0.5)?;
        let latents = sd.encode_image(&images, None)?;
        let decoded = sd.decode(&latents)?;
        features.push(judge.score(&judge_view(&decoded)?)?.features);
    }
    let features = Tensor::cat(&features, 0)?;
    Ok(frechet_distance(
        &FeatureStats::from_features(&features)?,
        reference,
    ))
}

pub fn run(args: EvalTxt2imgArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.per_prompt > 0,
        "--per-prompt = 0 is not allowed; expected at least 1"
    );
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::embedded::model_dir()?,
    };
    let load_start = Instant::now();
    let sd = StableDiffusion::load_dir(&dir, LoadOptions::default())?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let sampler = build_sampler(
        SamplerKind::parse(&args.sampler)?,
        &sd.scheduler,
        &SamplerOptions::default(),
        args.steps,
    )?;
    let mut report = serde_json::Map::new();
    let mut grid_columns = Vec::new();
    let mut all_hits = 0usize;
    let mut all_total = 0usize;
    let mut per_dataset = Vec::new();
    let mut seed = args.seed;
    for name in &args.datasets {
        let classes_path = shipped_classes(name)
            .with_context(|| format!("no classes.json found for dataset \"{name}\""))?;
        let captions = ClassCaptions::load(&classes_path, EXTRA_TEMPLATES)?;
        let judge_path = shipped_judge(name)
            .with_context(|| format!("no judge found for dataset \"{name}\""))?;
        let judge = Judge::load(&judge_path, &Device::Cpu)?;
        let reference = FeatureStats::load(&judge_path.join("test_stats.safetensors"))?;
        let prompts: Vec<String> = (0..captions.num_classes())
            .map(|c| captions.primary(c).to_string())
            .collect();
        let bar = ProgressBar::new(prompts.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(&format!("{name} {{bar:30}} {{pos}}/{{len}} eta {{eta}}"))
                .expect("valid template"),
        );
        let start = Instant::now();
        let images = sample_prompts(
            &sd,
            sampler.as_ref(),
            &prompts,
            args.per_prompt,
            PromptGuidance {
                scale: args.guidance,
                interval: args.guidance_interval,
            },
            seed,
            &mut |done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        seed += prompts.len() as u64;
        let seconds = start.elapsed().as_secs_f64();
        let judged = judge_view(&images)?;
        let verdict = judge.score(&judged)?;
        let labels: Vec<u32> = (0..prompts.len() as u32)
            .flat_map(|c| std::iter::repeat_n(c, args.per_prompt))
            .collect();
        let accuracy = verdict.accuracy(&labels)?;
        let predicted = verdict.predicted()?;
        let per_class: Vec<f64> = (0..prompts.len())
            .map(|c| {
                let own = &predicted[c * args.per_prompt..(c + 1) * args.per_prompt];
                own.iter().filter(|p| **p as usize == c).count() as f64 / args.per_prompt as f64
            })
            .collect();
        let n = images.dim(0)?;
        let fd = frechet_distance(&FeatureStats::from_features(&verdict.features)?, &reference);
        let floor = fd_floor(&judge_path, n);
        let reconstruction = match &args.reconstruction_data {
            Some(root) => Some(reconstruction_fd(
                &sd,
                &root.join(name),
                &judge,
                &reference,
                n,
            )?),
            None => None,
        };
        all_hits += (accuracy * n as f64).round() as usize;
        all_total += n;
        eprintln!(
            "{name}: {n} images ({} per caption, guidance {}, {} {} steps, {seconds:.1} s): \
             drawn as the prompted class {:.1}% (worst class {:.0}%), Fréchet distance {fd:.2} \
             (floor {}{}), classes {:?}",
            args.per_prompt,
            args.guidance,
            args.sampler,
            args.steps,
            100.0 * accuracy,
            100.0 * per_class.iter().cloned().fold(f64::INFINITY, f64::min),
            floor.map_or("n/a".into(), |f| format!("{f:.2}")),
            reconstruction.map_or(String::new(), |r| format!(", VAE reconstructions {r:.2}")),
            verdict.histogram()?
        );
        per_dataset.push(serde_json::json!({
            "dataset": name,
            "images": n,
            "accuracy": accuracy,
            "per_class_accuracy": per_class,
            "fd": fd,
            "fd_floor": floor,
            "fd_over_floor": floor.map(|f| fd / f),
            "vae_reconstruction_fd": reconstruction,
            "class_histogram": verdict.histogram()?,
            "mean_confidence": verdict.mean_confidence()?,
            "sampling_seconds": seconds,
            "prompts": prompts,
        }));
        if args.grid.is_some() {
            let shown = args.per_prompt.min(8);
            for c in 0..prompts.len() {
                grid_columns.push(images.narrow(0, c * args.per_prompt, shown)?);
            }
        }
    }
    if let Some(path) = &args.grid {
        let columns = grid_columns.len();
        let images = Tensor::cat(&grid_columns, 0)?.affine(2.0, -1.0)?;
        crate::image_io::save_png(&class_columns_grid(&images, columns)?, path, None)?;
        eprintln!("wrote {}", path.display());
    }
    report.insert("model".into(), dir.display().to_string().into());
    report.insert("load_seconds".into(), load_seconds.into());
    report.insert("guidance".into(), args.guidance.into());
    report.insert(
        "guidance_interval".into(),
        serde_json::json!(args.guidance_interval.map(|(low, high)| [low, high])),
    );
    report.insert("sampler".into(), args.sampler.clone().into());
    report.insert("steps".into(), args.steps.into());
    report.insert("per_prompt".into(), args.per_prompt.into());
    report.insert(
        "accuracy".into(),
        (all_hits as f64 / all_total.max(1) as f64).into(),
    );
    report.insert("datasets".into(), per_dataset.into());
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}
