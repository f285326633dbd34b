//! `diffuse eval-txt2img`: how well a text-to-image model trained on labelled datasets (the
//! embedded default) draws what it is asked for, scored by judges: each dataset's class captions
//! read by its public judge (digits, clothes), and a judged prompt list (`prompts/everyday.tsv`)
//! drawn in emoji style and as doodles, read by the emoji and doodle judges `train-judge` makes.
//! For each set: the fraction drawn as the prompted class, the per-prompt figures, the
//! predicted-class histogram, and, where the judge has the test set's statistics, the Fréchet
//! distance of judge features beside the judge's floor for the same sample count.

use crate::data::captions::{ClassCaptions, EXTRA_TEMPLATES};
use crate::data::idx::{LabelledImages, Split};
use crate::data::image_set::place_grey;
use crate::data::judged_prompts::{read_judged_prompts, JudgedPrompt};
use crate::judge::{fd_floor, judge_class_names, judge_view, shipped_classes, shipped_judge};
use crate::judge::{frechet_distance, FeatureStats, Judge};
use crate::pipeline::pixel::{class_columns_grid, grid};
use crate::pipeline::txt2img::{sample_prompts, PromptGuidance};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::sampler::{build_sampler, Sampler, SamplerKind, SamplerOptions};
use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a listed prompt becomes in each style it is judged in: a user asking for the style says
/// it after the thing, and the training captions never read this way.
const EMOJI_SUFFIX: &str = ", emoji";
const DOODLE_SUFFIX: &str = ", doodle";

#[derive(Debug, Clone, Args)]
pub struct EvalTxt2imgArgs {
    /// The model folder (default: the embedded model in weights/).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The datasets whose classes the model was trained on, in training order (their classes
    /// are numbered on: MNIST 0-9, then Fashion-MNIST 10-19).
    #[arg(long = "dataset", default_values_t = ["mnist".to_string(), "fashion-mnist".to_string()])]
    pub datasets: Vec<String>,
    /// Judge no dataset's class captions (only --prompts).
    #[arg(long)]
    pub no_datasets: bool,
    /// Images per class caption.
    #[arg(long, default_value_t = 100)]
    pub per_prompt: usize,
    /// A judged prompt list (prompts/everyday.tsv): each prompt is drawn as "<prompt>, emoji"
    /// and read by --emoji-judge, and where it names a doodle class as "<prompt>, doodle", read
    /// by --doodle-judge.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A judge folder (train-judge's `judge/`) whose classes are emoji concepts (default: the
    /// shipped one, tests/fixtures/judges/emoji, trained by configs/judge-emoji.toml).
    #[arg(long)]
    pub emoji_judge: Option<PathBuf>,
    /// A judge folder whose classes are the Quick, Draw! classes (default: the shipped one,
    /// trained by configs/judge-doodles.toml).
    #[arg(long)]
    pub doodle_judge: Option<PathBuf>,
    /// Images per listed prompt and style.
    #[arg(long, default_value_t = 4)]
    pub per_listed_prompt: usize,
    /// Also write a grid of the first emoji-style picture of every listed prompt, 12 across, in
    /// the list's order.
    #[arg(long)]
    pub prompt_grid: Option<PathBuf>,
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
    /// Also write a grid of the first 8 images of every dataset class, one class a column.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Prompts one judge reads: each prompt's pictures should be read as its label.
struct JudgedSet {
    name: String,
    prompts: Vec<String>,
    labels: Vec<u32>,
    per_prompt: usize,
    judge: Judge,
    judge_dir: PathBuf,
    /// The judge's feature statistics of the dataset's test set, where it has them.
    reference: Option<FeatureStats>,
    /// The dataset folder whose test images the VAE reconstructs for the Fréchet distance.
    reconstruction: Option<PathBuf>,
}

/// The Fréchet distance between the judge features of the VAE's reconstructions (posterior
/// means) of the first `n` test images, placed as the trainer places them, and the test set.
fn reconstruction_fd(
    sd: &StableDiffusion,
    data_dir: &Path,
    judge: &Judge,
    reference: &FeatureStats,
    n: usize,
) -> anyhow::Result<f64> {
    let data = LabelledImages::load(data_dir, Split::Test)?;
    let size = sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale_factor();
    let channels = sd.vae.config.in_channels;
    let area = data.height * data.width;
    let mut features = Vec::new();
    for start in (0..n.min(data.len())).step_by(100) {
        let end = n.min(data.len()).min(start + 100);
        let bytes: Vec<f32> = (start..end)
            .flat_map(|i| {
                place_grey(
                    &data.pixels[i * area..(i + 1) * area],
                    data.height,
                    data.width,
                    size,
                    channels,
                )
            })
            .map(|p| p as f32 / 255.0)
            .collect();
        let images = Tensor::from_vec(bytes, (end - start, channels, size, size), &Device::Cpu)?;
        let latents = sd.encode_image(&images, None)?;
        let decoded = sd.decode(&latents)?;
        features.push(judge.score(&judge_view(&decoded, judge.shape)?)?.features);
    }
    let features = Tensor::cat(&features, 0)?;
    Ok(frechet_distance(
        &FeatureStats::from_features(&features)?,
        reference,
    ))
}

/// A dataset's class captions and its shipped judge.
fn dataset_set(name: &str, args: &EvalTxt2imgArgs) -> anyhow::Result<JudgedSet> {
    let classes_path = shipped_classes(name)
        .with_context(|| format!("no classes.json found for dataset \"{name}\""))?;
    let captions = ClassCaptions::load(&classes_path, EXTRA_TEMPLATES)?;
    let judge_dir =
        shipped_judge(name).with_context(|| format!("no judge found for dataset \"{name}\""))?;
    Ok(JudgedSet {
        name: name.to_string(),
        prompts: (0..captions.num_classes())
            .map(|c| captions.primary(c).to_string())
            .collect(),
        labels: (0..captions.num_classes() as u32).collect(),
        per_prompt: args.per_prompt,
        judge: Judge::load(&judge_dir, &Device::Cpu)?,
        reference: Some(FeatureStats::load(
            &judge_dir.join("test_stats.safetensors"),
        )?),
        reconstruction: args
            .reconstruction_data
            .as_ref()
            .map(|root| root.join(name)),
        judge_dir,
    })
}

/// The listed prompts that name a class of the judge in `judge_dir` (`class_of`), each with
/// `suffix`, labelled by that class; a listed class the judge lacks is an error naming both.
fn listed_set(
    name: &str,
    list: &[JudgedPrompt],
    list_path: &Path,
    judge_dir: &Path,
    suffix: &str,
    class_of: impl Fn(&JudgedPrompt) -> Option<&str>,
    per_prompt: usize,
) -> anyhow::Result<JudgedSet> {
    let names = judge_class_names(judge_dir)?;
    let mut prompts = Vec::new();
    let mut labels = Vec::new();
    for item in list {
        let Some(class) = class_of(item) else {
            continue;
        };
        let label = names.iter().position(|n| n == class).with_context(|| {
            format!(
                "{}: \"{class}\" (for \"{}\") is not a class of the judge in {}",
                list_path.display(),
                item.prompt,
                judge_dir.display()
            )
        })?;
        prompts.push(format!("{}{suffix}", item.prompt));
        labels.push(label as u32);
    }
    Ok(JudgedSet {
        name: name.to_string(),
        prompts,
        labels,
        per_prompt,
        judge: Judge::load(judge_dir, &Device::Cpu)?,
        judge_dir: judge_dir.to_path_buf(),
        reference: None,
        reconstruction: None,
    })
}

/// Every set the arguments ask for, datasets first.
fn judged_sets(args: &EvalTxt2imgArgs) -> anyhow::Result<Vec<JudgedSet>> {
    let mut sets = Vec::new();
    if !args.no_datasets {
        for name in &args.datasets {
            sets.push(dataset_set(name, args)?);
        }
    }
    if let Some(path) = &args.prompts {
        let list = read_judged_prompts(path)?;
        let emoji = args
            .emoji_judge
            .clone()
            .or_else(|| shipped_judge("emoji"))
            .context("--prompts needs --emoji-judge (a judge folder of emoji concepts)")?;
        sets.push(listed_set(
            "emoji",
            &list,
            path,
            &emoji,
            EMOJI_SUFFIX,
            |p| Some(p.emoji.as_str()),
            args.per_listed_prompt,
        )?);
        if let Some(doodle) = args
            .doodle_judge
            .clone()
            .or_else(|| shipped_judge("doodles"))
        {
            let doodles = listed_set(
                "doodles",
                &list,
                path,
                &doodle,
                DOODLE_SUFFIX,
                |p| p.doodle.as_deref(),
                args.per_listed_prompt,
            )?;
            // A list whose every doodle column is '-' asks for no doodles.
            if !doodles.prompts.is_empty() {
                sets.push(doodles);
            }
        }
    }
    anyhow::ensure!(
        !sets.is_empty(),
        "nothing to judge: --no-datasets without --prompts"
    );
    Ok(sets)
}

/// Draws and judges one set: its JSON report and the pictures, prompt-major, in [0, 1].
fn judge_set(
    sd: &StableDiffusion,
    sampler: &dyn Sampler,
    set: &JudgedSet,
    args: &EvalTxt2imgArgs,
    seed: u64,
) -> anyhow::Result<(serde_json::Value, Tensor)> {
    let name = &set.name;
    let per = set.per_prompt;
    let bar = ProgressBar::new(set.prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!("{name} {{bar:30}} {{pos}}/{{len}} eta {{eta}}"))
            .expect("valid template"),
    );
    let start = Instant::now();
    let images = sample_prompts(
        sd,
        sampler,
        &set.prompts,
        per,
        PromptGuidance {
            scale: args.guidance,
            interval: args.guidance_interval,
        },
        seed,
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let verdict = set.judge.score(&judge_view(&images, set.judge.shape)?)?;
    let labels: Vec<u32> = set
        .labels
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, per))
        .collect();
    let accuracy = verdict.accuracy(&labels)?;
    let predicted = verdict.predicted()?;
    let per_prompt: Vec<f64> = set
        .labels
        .iter()
        .enumerate()
        .map(|(k, &label)| {
            let own = &predicted[k * per..(k + 1) * per];
            own.iter().filter(|p| **p == label).count() as f64 / per as f64
        })
        .collect();
    let n = images.dim(0)?;
    let fd = match &set.reference {
        Some(reference) => Some(frechet_distance(
            &FeatureStats::from_features(&verdict.features)?,
            reference,
        )),
        None => None,
    };
    let floor = fd.and_then(|_| fd_floor(&set.judge_dir, n));
    let reconstruction = match (&set.reconstruction, &set.reference) {
        (Some(dir), Some(reference)) => Some(reconstruction_fd(sd, dir, &set.judge, reference, n)?),
        _ => None,
    };
    let mut worst: Vec<(f64, &str)> = per_prompt
        .iter()
        .zip(&set.prompts)
        .map(|(a, p)| (*a, p.as_str()))
        .collect();
    worst.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!(
        "{name}: {n} images ({per} per prompt, guidance {}, {} {} steps, {seconds:.1} s): drawn as \
         the prompted class {:.1}%{}{}; weakest: {}",
        args.guidance,
        args.sampler,
        args.steps,
        100.0 * accuracy,
        fd.map_or(String::new(), |fd| format!(
            ", Fréchet distance {fd:.2} (floor {})",
            floor.map_or("n/a".into(), |f| format!("{f:.2}"))
        )),
        reconstruction.map_or(String::new(), |r| format!(", VAE reconstructions {r:.2}")),
        worst
            .iter()
            .take(5)
            .map(|(a, p)| format!("\"{p}\" {:.0}%", 100.0 * a))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = serde_json::json!({
        "set": name,
        "images": n,
        "accuracy": accuracy,
        "per_prompt_accuracy": per_prompt,
        "prompts": set.prompts,
        "fd": fd,
        "fd_floor": floor,
        "fd_over_floor": fd.zip(floor).map(|(fd, f)| fd / f),
        "vae_reconstruction_fd": reconstruction,
        "class_histogram": verdict.histogram()?,
        "mean_confidence": verdict.mean_confidence()?,
        "sampling_seconds": seconds,
        "seconds_per_image": seconds / n.max(1) as f64,
    });
    Ok((report, images))
}

pub fn run(args: EvalTxt2imgArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.per_prompt > 0 && args.per_listed_prompt > 0,
        "--per-prompt and --per-listed-prompt must be at least 1"
    );
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::embedded::model_dir()?,
    };
    // Every list, judge and class is checked before the first picture is drawn.
    let sets = judged_sets(&args)?;
    let load_start = Instant::now();
    let sd = StableDiffusion::load_dir(&dir, LoadOptions::default())?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let sampler = build_sampler(
        SamplerKind::parse(&args.sampler)?,
        &sd.scheduler,
        &SamplerOptions::default(),
        args.steps,
    )?;
    let mut reports = Vec::new();
    let mut grid_columns = Vec::new();
    let mut seed = args.seed;
    for set in &sets {
        let (report, images) = judge_set(&sd, sampler.as_ref(), set, &args, seed)?;
        seed += set.prompts.len() as u64;
        let per = set.per_prompt;
        if args.grid.is_some() && set.reference.is_some() {
            for k in 0..set.prompts.len() {
                grid_columns.push(images.narrow(0, k * per, per.min(8))?);
            }
        }
        if let (Some(path), "emoji") = (&args.prompt_grid, set.name.as_str()) {
            let firsts: Vec<Tensor> = (0..set.prompts.len())
                .map(|k| images.get(k * per))
                .collect::<candle_core::Result<_>>()?;
            let tiles = Tensor::stack(&firsts, 0)?.affine(2.0, -1.0)?;
            crate::image_io::save_png(&grid(&tiles, 12)?, path, None)?;
            eprintln!("wrote {}", path.display());
        }
        reports.push(report);
    }
    if let (Some(path), false) = (&args.grid, grid_columns.is_empty()) {
        let columns = grid_columns.len();
        let images = Tensor::cat(&grid_columns, 0)?.affine(2.0, -1.0)?;
        crate::image_io::save_png(&class_columns_grid(&images, columns)?, path, None)?;
        eprintln!("wrote {}", path.display());
    }
    let json = serde_json::json!({
        "model": dir.display().to_string(),
        "load_seconds": load_seconds,
        "guidance": args.guidance,
        "guidance_interval": args.guidance_interval.map(|(low, high)| [low, high]),
        "sampler": args.sampler,
        "steps": args.steps,
        "per_prompt": args.per_prompt,
        "per_listed_prompt": args.per_listed_prompt,
        "sets": reports,
    });
    if args.json {
        println!("{json}");
    }
    Ok(())
}
