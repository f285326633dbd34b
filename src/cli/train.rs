//! `diffuse train --config configs/ddpm-mnist.toml`: pixel-space DDPM training in the shared
//! loop (`train_loop`: progress, loss CSV and curve, sample grids, atomic checkpoints, Ctrl-C
//! saving, `--resume`). A config with `model.autoencoder = "vae"` goes to `train_ldm`.

use super::train_loop::TrainArgs;
use super::train_loop::{
    apply_overrides, check_fresh_start, run_loop, time_limit, LoopSettings, TrainingRun,
};
use crate::data::idx::{LabelledImages, Split};
use crate::pipeline::pixel::grid;
use crate::sampler::{SamplerKind, SamplerOptions};
use crate::train::config::TrainConfig;
use crate::train::pixel::PixelTrainer;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// File names inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const WEIGHTS_FILE: &str = "model.safetensors";
const CSV_HEADER: &str = "step,loss,mse,vb_bits,grad_norm,learning_rate,seconds";

struct PixelRun {
    trainer: PixelTrainer,
    data: LabelledImages,
    out_dir: PathBuf,
}

impl TrainingRun for PixelRun {
    fn step(&self) -> usize {
        self.trainer.step
    }

    fn train_step(&mut self) -> anyhow::Result<Vec<f64>> {
        let s = self.trainer.train_step(&self.data)?;
        Ok(vec![s.loss, s.mse, s.vb_bits, s.grad_norm, s.learning_rate])
    }

    fn save(&mut self) -> anyhow::Result<()> {
        self.trainer.save(&self.out_dir.join(CHECKPOINT_FILE))?;
        self.trainer
            .save_weights(&self.out_dir.join(WEIGHTS_FILE), candle_core::DType::F32)?;
        Ok(())
    }

    fn sample(&mut self, step: usize) -> anyhow::Result<()> {
        sample_grid(
            &self.trainer,
            &self.out_dir.join(format!("samples-{step:07}.png")),
        )
    }
}

/// 64 samples from the averaged weights (DDIM, 50 steps, fixed seed), labelled 0, 1, 2, ...
/// for class-conditional models, as one grid.
fn sample_grid(trainer: &PixelTrainer, path: &Path) -> anyhow::Result<()> {
    let model = trainer.ema_model()?;
    let n = 64;
    let labels: Option<Vec<u32>> = model
        .num_classes()
        .map(|k| (0..n).map(|i| (i % k) as u32).collect());
    let images = model.sample(
        SamplerKind::Ddim,
        &SamplerOptions::default(),
        50,
        n,
        labels.as_deref(),
        0,
        &mut |_, _| {},
    )?;
    let cols = model.num_classes().unwrap_or(8);
    crate::image_io::save_png(&grid(&images, cols)?, path, None)?;
    Ok(())
}

/// Whether a training config describes a latent model (`model.autoencoder = "vae"`).
fn is_latent_config(text: &str) -> bool {
    toml::from_str::<toml::Value>(text)
        .ok()
        .and_then(|v| {
            v.get("model")?
                .get("autoencoder")?
                .as_str()
                .map(|a| a == "vae")
        })
        .unwrap_or(false)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    if is_latent_config(&text) {
        return super::train_ldm::run(args, &text);
    }
    let mut config =
        TrainConfig::from_toml_str(&text).with_context(|| format!("{}", args.config.display()))?;
    if let Some(data) = args.data {
        config.data.path = data;
    }
    apply_overrides(
        &mut config.train.out_dir,
        &mut config.train.steps,
        args.out_dir,
        args.steps,
    )?;
    let limit = time_limit(args.time_limit)?;
    config.validate()?;
    let out_dir = config.train.out_dir.clone();
    let checkpoint = out_dir.join(CHECKPOINT_FILE);
    check_fresh_start(&checkpoint, args.resume)?;
    // Data first: a bad file stops the run before any work.
    let data = LabelledImages::load(&config.data.path, Split::Train)?;
    anyhow::ensure!(
        data.height == config.model.image_size && data.width == config.model.image_size,
        "{}: images are {}x{}, but model.image_size = {}",
        config.data.path.display(),
        data.height,
        data.width,
        config.model.image_size
    );
    if let Some(k) = config.model.num_classes {
        if let Some(bad) = data.labels.iter().find(|l| **l as usize >= k) {
            anyhow::bail!(
                "{}: label {bad} is outside model.num_classes = {k}",
                config.data.path.display()
            );
        }
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let device = super::parse_training_device(&args.device)?;
    let trainer = if args.resume {
        let trainer = PixelTrainer::resume(config.clone(), &checkpoint, &device)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), trainer.step);
        trainer
    } else {
        PixelTrainer::new(config.clone(), &device)?
    };
    std::fs::write(out_dir.join("config.toml"), config.to_toml())?;
    let total = config.train.steps;
    eprintln!(
        "training {} parameters on {} images ({}x{}), {} steps of batch {}",
        trainer.parameter_count(),
        data.len(),
        data.height,
        data.width,
        total,
        config.train.batch_size
    );
    let parameters = trainer.parameter_count();
    let mut run = PixelRun {
        trainer,
        data,
        out_dir: out_dir.clone(),
    };
    let summary = run_loop(
        &mut run,
        &LoopSettings {
            out_dir: out_dir.clone(),
            total_steps: total,
            log_every: config.train.log_every,
            checkpoint_every: config.train.checkpoint_every,
            sample_every: config.train.sample_every,
            time_limit: limit,
            csv_header: CSV_HEADER,
            resume: args.resume,
        },
    )?;
    let (seconds, steps_run) = (summary.seconds, summary.steps_run);
    eprintln!(
        "{} steps in {seconds:.1} s ({:.2} steps/s); weights: {}",
        steps_run,
        steps_run as f64 / seconds.max(1e-9),
        out_dir.join(WEIGHTS_FILE).display()
    );
    if args.json {
        let summary = serde_json::json!({
            "steps": run.trainer.step,
            "steps_run": steps_run,
            "seconds": seconds,
            "steps_per_second": steps_run as f64 / seconds.max(1e-9),
            "final_loss": summary.final_loss,
            "parameters": parameters,
            "checkpoint": out_dir.join(CHECKPOINT_FILE),
            "weights": out_dir.join(WEIGHTS_FILE),
        });
        println!("{summary}");
    }
    Ok(())
}
