//! `diffuse train --config configs/ddpm-mnist.toml` (pixel-space DDPM) or
//! `--config configs/tiny-ldm.toml` (a text-to-image latent model): the config's
//! `[model] autoencoder` says which; both run in the training session.

use super::session_args::{report, start, Cadence, SessionArgs};
use crate::data::idx::{LabelledImages, Split};
use crate::train::config::LdmTrainConfig;
use crate::train::config::{TrainConfig, TrainingConfig};
use crate::train::latent_data::LatentData;
use crate::train::ldm::{LdmRun, LdmTrainer, PIPELINE_DIR};
use crate::train::pixel::{PixelRun, PixelTrainer, WEIGHTS_FILE};
use crate::train::session::{check_out_dir, run_session, CHECKPOINT_FILE};
use clap::Args;
use std::path::PathBuf;

/// The training cache of a latent run: the training images' latents, kept between runs of the
/// same output folder.
const LATENT_CACHE: &str = "latents.safetensors";

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The TOML training config (configs/ddpm-mnist.toml, configs/tiny-ldm.toml); its relative
    /// paths are taken from its folder.
    #[arg(long)]
    pub config: PathBuf,
    /// Pixel configs: the folder with the IDX files, instead of data.path.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Latent configs: the dtype of the written pipeline's text encoder and U-Net (f32, f16 or
    /// bf16; the training state stays f32).
    #[arg(long, default_value = "f32")]
    pub pipeline_dtype: String,
    #[command(flatten)]
    pub session: SessionArgs,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    match TrainingConfig::from_file(&args.config)? {
        TrainingConfig::Pixel(config) => train_pixel(&args, config),
        TrainingConfig::Latent(config) => train_latent(&args, config),
    }
}

fn train_pixel(args: &TrainArgs, mut config: TrainConfig) -> anyhow::Result<()> {
    if let Some(data) = &args.data {
        config.data.path = data.clone();
    }
    let cadence = Cadence::from(&config.train);
    let train = &mut config.train;
    let settings = args
        .session
        .apply(&mut train.out_dir, &mut train.steps, cadence)?;
    config.validate()?;
    let out_dir = settings.out_dir.clone();
    let checkpoint = check_out_dir(&out_dir, settings.resume)?;
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
    let device = args.session.device()?;
    let trainer = start(
        &settings,
        &checkpoint,
        |path| PixelTrainer::resume(config.clone(), path, &device),
        || PixelTrainer::new(config.clone(), &device),
        PixelTrainer::step,
    )?;
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("config.toml"), config.to_toml())?;
    eprintln!(
        "training {} parameters on {} images ({}x{}), {} steps of batch {}",
        trainer.parameter_count(),
        data.len(),
        data.height,
        data.width,
        settings.total_steps,
        config.train.batch_size
    );
    let parameters = trainer.parameter_count();
    let mut run = PixelRun { trainer, data };
    let summary = run_session(&mut run, &settings)?;
    let weights = out_dir.join(WEIGHTS_FILE);
    let mut json = report(&summary, &format!("weights: {}", weights.display()));
    if args.session.json {
        json.insert("parameters".into(), parameters.into());
        json.insert("checkpoint".into(), serde_json::json!(checkpoint));
        json.insert("weights".into(), serde_json::json!(weights));
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}

fn train_latent(args: &TrainArgs, mut config: LdmTrainConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.data.is_none(),
        "--data names one folder; a text-to-image config lists its folders in data.paths"
    );
    let cadence = Cadence::from(&config.train);
    let train = &mut config.train;
    let settings = args
        .session
        .apply(&mut train.out_dir, &mut train.steps, cadence)?;
    let pipeline_dtype = super::parse_dtype("--pipeline-dtype", &args.pipeline_dtype)?;
    config.validate()?;
    let out_dir = settings.out_dir.clone();
    let checkpoint = check_out_dir(&out_dir, settings.resume)?;
    let device = args.session.device()?;
    // Data first: a bad file stops the run before any work.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding latents {bar:30} {pos}/{len} {eta}")
            .expect("valid template"),
    );
    let cache = out_dir.join(LATENT_CACHE);
    let data = LatentData::load(&config, Split::Train, Some(&cache), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let dims = data.latent_dims()?;
    let trainer = start(
        &settings,
        &checkpoint,
        |path| LdmTrainer::resume(config.clone(), dims, path, &device),
        || LdmTrainer::new(config.clone(), dims, &device),
        LdmTrainer::step,
    )?;
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("config.toml"), config.to_toml())?;
    eprintln!(
        "training a text encoder and U-Net ({:.2} M parameters) on {} latents {:?} of {} classes, \
         {} steps of batch {}",
        trainer.parameter_count() as f64 / 1e6,
        data.len(),
        dims,
        data.num_classes(),
        settings.total_steps,
        config.train.batch_size
    );
    let parameters = trainer.parameter_count();
    let mut run = LdmRun {
        trainer,
        data,
        pipeline_dtype,
    };
    let summary = run_session(&mut run, &settings)?;
    let pipeline = out_dir.join(PIPELINE_DIR);
    if summary.steps_run == 0 {
        // Nothing trained (resumed at the last step): the pipeline is still written, so that
        // `--resume --pipeline-dtype f16` exports a finished run.
        run.write_pipeline(&out_dir)?;
    }
    let mut json = report(&summary, &format!("pipeline: {}", pipeline.display()));
    if args.session.json {
        json.insert("parameters".into(), parameters.into());
        json.insert(
            "checkpoint".into(),
            serde_json::json!(out_dir.join(CHECKPOINT_FILE)),
        );
        json.insert("pipeline".into(), serde_json::json!(pipeline));
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}
