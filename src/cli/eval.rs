//! `diffuse eval --checkpoint ...`: test-set likelihood two ways (the variational bound and the
//! probability-flow ODE) and sample quality by the public judge.

use super::sample::{labels_for, sample_many};
use super::sampler_args::SamplerTuning;
use crate::data::idx::{LabelledImages, Split};
use crate::judge::{frechet_distance, FeatureStats, Judge};
use crate::ops::ode::Tolerance;
use crate::pipeline::pixel::{PixelDiffusion, WeightsChoice};
use crate::sampler::{SamplerKind, SeededNoise};
use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Where to run: auto (the GPU when this binary has CUDA and the machine a GPU, else the
    /// CPU), cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A checkpoint or weights file from `diffuse train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The dataset folder (default: the training config's data.path).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Test images (a seeded random subset) for the variational bound; 0 skips it.
    #[arg(long, default_value_t = 100)]
    pub subset: usize,
    /// Test images for the ODE likelihood; 0 skips it.
    #[arg(long, default_value_t = 32)]
    pub ode_subset: usize,
    /// RK45 tolerance of the ODE likelihood (rtol = atol; Song et al. use 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub ode_tolerance: f64,
    /// Generated images scored by the judge; 0 skips sampling.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Sampler for the judged images.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Sampling steps; a comma-separated list scores each.
    #[arg(long, default_value = "50")]
    pub steps: String,
    #[command(flatten)]
    pub tuning: SamplerTuning,
    /// The judge folder (default: the shipped judge of the model's data.name, in
    /// tests/fixtures/judges/).
    #[arg(long)]
    pub judge: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per batch in the likelihood passes.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} eta {{eta}}"))
            .expect("valid template"),
    );
    bar
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The standard error of the mean of per-image figures (sample standard deviation over
/// sqrt(n)): how far a subset's bits/dim may sit from the whole test split's. None below two
/// images.
fn standard_error(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let center = mean(values);
    let squares: f64 = values.iter().map(|v| (v - center).powi(2)).sum();
    Some((squares / (n - 1) as f64 / n as f64).sqrt())
}

/// " +- SE" for a log line, empty where there is none.
fn plus_minus(error: Option<f64>) -> String {
    error.map(|e| format!(" +- {e:.4}")).unwrap_or_default()
}

/// A seeded random subset of the test split (the first images of MNIST's test split come
/// from a cleaner writer population than the rest, so they are not representative).
fn subset(n_total: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..n_total).collect();
    indices.shuffle(SeededNoise::new(seed).rng());
    indices.truncate(n.min(n_total));
    indices
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = super::parse_device(&args.device)?;
    let model = PixelDiffusion::load(&args.checkpoint, WeightsChoice::Ema, &device)?;
    let trained =
        crate::train::config::TrainConfig::from_toml_str(&crate::pipeline::pixel::training_config(
            &crate::weights::header_metadata(&args.checkpoint)?,
            &args.checkpoint,
        )?)
        .with_context(|| format!("{}: its training config", args.checkpoint.display()))?;
    // The training config's data path is absolute when it came from a config file (its paths
    // are taken from the file's folder); a relative one (files written before that) names no
    // folder for sure, so it is not guessed from the working directory.
    let data_dir = match &args.data {
        Some(dir) => dir.clone(),
        None if trained.data.path.is_absolute() => trained.data.path.clone(),
        None => PathBuf::new(),
    };
    let data_missing = args.data.is_none() && !trained.data.path.is_absolute();
    let mut report = serde_json::Map::new();
    let batch = args.batch.max(1);
    let needs_data = args.subset > 0 || args.ode_subset > 0;
    if needs_data && data_missing {
        anyhow::bail!(
            "{}: its training config's data.path ({}) is relative to where that run started; \
             give --data DIR (the folder with the IDX test files)",
            args.checkpoint.display(),
            trained.data.path.display()
        );
    }
    let test = if needs_data {
        Some(
            LabelledImages::load(&data_dir, Split::Test)
                .context("the test split (give --data if the config's path does not apply here)")?,
        )
    } else {
        None
    };
    let labels_of = |data: &LabelledImages, idx: &[usize]| -> anyhow::Result<Option<Tensor>> {
        Ok(match model.num_classes() {
            Some(_) => Some(data.label_batch(idx, &device)?),
            None => None,
        })
    };

    if let (Some(test), true) = (&test, args.subset > 0) {
        let indices = subset(test.len(), args.subset, args.seed);
        let steps = model.scheduler.num_train_timesteps;
        let progress = bar(indices.len().div_ceil(batch) * steps, "bound");
        let start = Instant::now();
        let mut terms = crate::pipeline::pixel::VlbTerms::default();
        for (i, chunk) in indices.chunks(batch).enumerate() {
            let x0 = test.batch(chunk, &device)?;
            let done = (i * steps) as u64;
            let part = model.vlb(
                &x0,
                labels_of(test, chunk)?.as_ref(),
                args.seed + i as u64,
                &mut |t| progress.set_position(done + t as u64),
            )?;
            terms.total.extend(part.total);
            terms.prior.extend(part.prior);
            terms.kl.extend(part.kl);
            terms.decoder.extend(part.decoder);
        }
        progress.finish_and_clear();
        let vlb = mean(&terms.total);
        let vlb_error = standard_error(&terms.total);
        eprintln!(
            "variational bound: {vlb:.4}{} bits/dim over {} test images (prior {:.5}, KL terms {:.4}, decoder {:.4}; {:.0} s)",
            plus_minus(vlb_error),
            indices.len(),
            mean(&terms.prior),
            mean(&terms.kl),
            mean(&terms.decoder),
            start.elapsed().as_secs_f64()
        );
        report.insert("vlb_bits_per_dim".into(), vlb.into());
        report.insert("vlb_standard_error".into(), vlb_error.into());
        report.insert(
            "vlb_terms".into(),
            serde_json::json!({
                "prior": mean(&terms.prior),
                "kl": mean(&terms.kl),
                "decoder": mean(&terms.decoder),
                "images": indices.len(),
            }),
        );
    }

    if let (Some(test), true) = (&test, args.ode_subset > 0) {
        let indices = subset(test.len(), args.ode_subset, args.seed + 1);
        let progress = bar(indices.len(), "ode");
        let start = Instant::now();
        let mut noise = SeededNoise::new(args.seed + 2);
        let mut bits = Vec::new();
        let mut evaluations = 0;
        let tolerance = Tolerance {
            rtol: args.ode_tolerance,
            atol: args.ode_tolerance,
        };
        for chunk in indices.chunks(batch) {
            let x0 = test.batch(chunk, &device)?;
            // Uniform dequantisation: (u8 + u) / 256 in [0, 1], then scaled to [-1, 1].
            let u: Vec<f32> = (0..x0.elem_count())
                .map(|_| rand::Rng::random::<f32>(noise.rng()))
                .collect();
            let u = Tensor::from_vec(u, x0.shape(), &device)?;
            let bytes = x0.affine(127.5, 127.5)?;
            let x = (bytes + u)?.affine(2.0 / 256.0, -1.0)?;
            // Rademacher probe for Hutchinson's trace estimator.
            let signs: Vec<f32> = (0..x0.elem_count())
                .map(|_| {
                    if rand::Rng::random_bool(noise.rng(), 0.5) {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect();
            let probe = Tensor::from_vec(signs, x0.shape(), &device)?;
            let result = model.ode_nll(&x, labels_of(test, chunk)?.as_ref(), &probe, tolerance)?;
            evaluations += result.evaluations;
            bits.extend(result.bits_per_dim);
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
        let ode = mean(&bits);
        let ode_error = standard_error(&bits);
        eprintln!(
            "probability-flow ODE: {ode:.4}{} bits/dim over {} test images ({evaluations} evaluations, {:.0} s)",
            plus_minus(ode_error),
            indices.len(),
            start.elapsed().as_secs_f64()
        );
        report.insert("ode_bits_per_dim".into(), ode.into());
        report.insert("ode_standard_error".into(), ode_error.into());
        report.insert("ode_images".into(), indices.len().into());
        report.insert("ode_evaluations".into(), evaluations.into());
    }

    if args.samples > 0 {
        let name = trained.data.name.clone().unwrap_or_default();
        let judge_path = args
            .judge
            .clone()
            .or_else(|| crate::judge::shipped_judge(&name))
            .with_context(|| format!("no judge found for dataset \"{name}\": give --judge DIR"))?;
        // The judge runs on the CPU, where its parity with the reference outputs is tested.
        let judge = Judge::load(&judge_path, &Device::Cpu)?;
        let reference = FeatureStats::load(&judge_path.join("test_stats.safetensors"))?;
        let kind = SamplerKind::parse(&args.sampler)?;
        let labels = labels_for(&model, None, args.samples);
        let mut scores = Vec::new();
        for steps in args
            .steps
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let steps: usize = steps.parse().map_err(|_| {
                anyhow::anyhow!("--steps = {steps} is not allowed; expected positive integers")
            })?;
            let start = Instant::now();
            let images = sample_many(
                &model,
                kind,
                &args.tuning,
                steps,
                args.samples,
                labels.as_deref(),
                args.seed,
                true,
            )?;
            let seconds = start.elapsed().as_secs_f64();
            let verdict = judge.score(&images.to_device(&Device::Cpu)?)?;
            let fd = frechet_distance(&FeatureStats::from_features(&verdict.features)?, &reference);
            let histogram = verdict.histogram()?;
            let floor = crate::judge::fd_floor(&judge_path, args.samples);
            eprintln!(
                "{} {steps} steps, {} samples: Fréchet distance {fd:.2} (floor {}), classes {:?}, mean confidence {:.3}",
                kind.cli_name(),
                args.samples,
                floor.map_or("n/a".into(), |f| format!("{f:.2}")),
                histogram,
                verdict.mean_confidence()?
            );
            let mut score = serde_json::json!({
                "sampler": kind.cli_name(),
                "steps": steps,
                "samples": args.samples,
                "fd": fd,
                "fd_floor": floor,
                "class_histogram": histogram,
                "min_class_fraction": *histogram.iter().min().unwrap_or(&0) as f64 / args.samples as f64,
                "mean_confidence": verdict.mean_confidence()?,
                "sampling_seconds": seconds,
            });
            if let Some(labels) = &labels {
                score["accuracy"] = verdict.accuracy(labels)?.into();
            }
            scores.push(score);
        }
        report.insert("judge".into(), judge_path.display().to_string().into());
        report.insert("samples".into(), scores.into());
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the direct formula on four values: mean 2.5, sample variance 5/3.
    #[test]
    fn standard_error_of_the_mean() {
        let error = standard_error(&[1.0, 2.0, 3.0, 4.0]).expect("four values");
        assert!((error - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(standard_error(&[1.5]), None);
        assert_eq!(standard_error(&[]), None);
    }
}
