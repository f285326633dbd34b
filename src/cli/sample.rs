//! `diffuse sample --checkpoint ...`: images from a pixel-space model, as one grid and/or one PNG
//! per sample.

use super::sampler_args::SamplerTuning;
use crate::pipeline::pixel::{grid, PixelDiffusion, WeightsChoice};
use crate::sampler::SamplerKind;
use anyhow::Context;
use candle_core::Tensor;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Where to run: auto (the GPU when this binary has CUDA and the machine a GPU, else the
    /// CPU), cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A checkpoint or weights file from `diffuse train` (e.g. weights/ddpm-mnist.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Sampler (see `diffuse samplers`).
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[command(flatten)]
    pub tuning: SamplerTuning,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of images.
    #[arg(short = 'n', long = "num", default_value_t = 64)]
    pub num: usize,
    /// Class of every image (class-conditional models; default: the classes in turn).
    #[arg(long)]
    pub class: Option<u32>,
    /// Write all images as one grid PNG.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Write one PNG per image into this folder.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Use the raw optimiser weights instead of their moving average.
    #[arg(long)]
    pub raw_weights: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Images per sampler call, so that memory stays bounded for large `-n`.
pub const BATCH: usize = 250;

/// Draws `n` images in batches; batch `i` uses seed `seed + i`, so a run's first images do not
/// depend on how many are asked for.
#[allow(clippy::too_many_arguments)]
pub fn sample_many(
    model: &PixelDiffusion,
    kind: SamplerKind,
    tuning: &SamplerTuning,
    steps: usize,
    n: usize,
    labels: Option<&[u32]>,
    seed: u64,
    show_progress: bool,
) -> anyhow::Result<Tensor> {
    let bar = if show_progress {
        ProgressBar::new((n.div_ceil(BATCH) * steps) as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("sampling {bar:30} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut batches = Vec::new();
    for (i, start) in (0..n).step_by(BATCH).enumerate() {
        let count = BATCH.min(n - start);
        let batch_labels = labels.map(|l| &l[start..start + count]);
        let done = bar.position();
        let images = model.sample(
            kind,
            &tuning.options(),
            steps,
            count,
            batch_labels,
            seed + i as u64,
            &mut |step, _| bar.set_position(done + step as u64),
        )?;
        batches.push(images);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&batches, 0)?)
}

/// Labels for `n` images: all `class`, or 0, 1, ..., k-1 in turn for a k-class model.
pub fn labels_for(model: &PixelDiffusion, class: Option<u32>, n: usize) -> Option<Vec<u32>> {
    match (model.num_classes(), class) {
        (_, Some(c)) => Some(vec![c; n]),
        (Some(k), None) => Some((0..n).map(|i| (i % k) as u32).collect()),
        (None, None) => None,
    }
}

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.num > 0, "-n = 0 is not allowed; expected at least 1");
    anyhow::ensure!(
        args.grid.is_some() || args.out_dir.is_some(),
        "nothing to write: give --grid FILE and/or --out-dir DIR"
    );
    let choice = if args.raw_weights {
        WeightsChoice::Raw
    } else {
        WeightsChoice::Ema
    };
    let model = PixelDiffusion::load(
        &args.checkpoint,
        choice,
        &super::parse_device(&args.device)?,
    )?;
    let kind = SamplerKind::parse(&args.sampler)?;
    let labels = labels_for(&model, args.class, args.num);
    let start = std::time::Instant::now();
    let images = sample_many(
        &model,
        kind,
        &args.tuning,
        args.steps,
        args.num,
        labels.as_deref(),
        args.seed,
        true,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.grid {
        let cols = (args.num as f64).sqrt().ceil() as usize;
        crate::image_io::save_png(&grid(&images, cols)?, path, None)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for i in 0..args.num {
            let image = images.get(i)?.affine(0.5, 0.5)?;
            crate::image_io::save_png(&image, &dir.join(format!("{i:05}.png")), None)?;
        }
        eprintln!("wrote {} images to {}", args.num, dir.display());
    }
    if args.json {
        let summary = serde_json::json!({
            "images": args.num,
            "sampler": kind.cli_name(),
            "steps": args.steps,
            "seed": args.seed,
            "seconds": seconds,
            "grid": args.grid,
            "out_dir": args.out_dir,
        });
        println!("{summary}");
    }
    Ok(())
}
