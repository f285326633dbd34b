//! `diffuse train --config configs/tiny-ldm.toml`: a text-to-image latent diffusion model
//! (text encoder and cross-attention U-Net trained together on a frozen VAE's latents), with the
//! shared training loop; the averaged weights are written as a diffusers pipeline folder.

use super::train_loop::TrainArgs;
use super::train_loop::{
    apply_overrides, check_fresh_start, run_loop, time_limit, LoopSettings, TrainingRun,
};
use crate::data::idx::Split;
use crate::pipeline::pixel::class_columns_grid;
use crate::pipeline::txt2img::{sample_prompts, PromptGuidance};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::sampler::{build_sampler, SamplerKind, SamplerOptions};
use crate::train::ldm::{LatentData, LdmTrainConfig, LdmTrainer};
use anyhow::Context;
use candle_core::DType;
use std::path::{Path, PathBuf};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The pipeline folder inside the output folder.
pub const PIPELINE_DIR: &str = "pipeline";
/// The training images' latents, kept between runs of the same output folder.
const LATENT_CACHE: &str = "latents.safetensors";
/// Guidance and steps of the sample grids.
const GRID_GUIDANCE: f64 = 4.0;
const GRID_STEPS: usize = 20;

struct LdmRun {
    trainer: LdmTrainer,
    data: LatentData,
    out_dir: PathBuf,
    pipeline_dtype: DType,
}

/// Samples from the pipeline folder just written: `per_class` images of every class's own
/// caption, one class a column.
fn class_grid(
    dir: &Path,
    captions: &[String],
    per_class: usize,
    path: &Path,
) -> anyhow::Result<()> {
    let sd = StableDiffusion::load_dir(dir, LoadOptions::default())?;
    let sampler = build_sampler(
        SamplerKind::Ddim,
        &sd.scheduler,
        &SamplerOptions::default(),
        GRID_STEPS,
    )?;
    let images = sample_prompts(
        &sd,
        sampler.as_ref(),
        captions,
        per_class,
        PromptGuidance {
            scale: GRID_GUIDANCE,
            interval: None,
        },
        0,
        &mut |_, _| {},
    )?;
    crate::image_io::save_png(
        &class_columns_grid(&images.affine(2.0, -1.0)?, captions.len())?,
        path,
        None,
    )?;
    Ok(())
}

impl TrainingRun for LdmRun {
    fn step(&self) -> usize {
        self.trainer.step
    }

    fn train_step(&mut self) -> anyhow::Result<Vec<f64>> {
        let stats = self.trainer.train_step(&self.data)?;
        Ok(vec![stats.loss, stats.grad_norm, stats.learning_rate])
    }

    fn save(&mut self) -> anyhow::Result<()> {
        self.trainer.save(&self.out_dir.join(CHECKPOINT_FILE))?;
        self.trainer
            .write_pipeline(&self.out_dir.join(PIPELINE_DIR), self.pipeline_dtype)?;
        Ok(())
    }

    fn sample(&mut self, step: usize) -> anyhow::Result<()> {
        let primary: Vec<String> = self.data.captions.iter().map(|c| c[0].clone()).collect();
        class_grid(
            &self.out_dir.join(PIPELINE_DIR),
            &primary,
            4,
            &self.out_dir.join(format!("samples-{step:07}.png")),
        )
    }
}

pub fn run(args: TrainArgs, config_text: &str) -> anyhow::Result<()> {
    let mut config = LdmTrainConfig::from_toml_str(config_text)
        .with_context(|| format!("{}", args.config.display()))?;
    anyhow::ensure!(
        args.data.is_none(),
        "--data names one folder; a text-to-image config lists its folders in data.paths"
    );
    apply_overrides(
        &mut config.train.out_dir,
        &mut config.train.steps,
        args.out_dir,
        args.steps,
    )?;
    let limit = time_limit(args.time_limit)?;
    let pipeline_dtype = super::parse_dtype("--pipeline-dtype", &args.pipeline_dtype)?;
    config.validate()?;
    let out_dir = config.train.out_dir.clone();
    let checkpoint = out_dir.join(CHECKPOINT_FILE);
    check_fresh_start(&checkpoint, args.resume)?;
    let device = super::parse_training_device(&args.device)?;
    // Data first: a bad file stops the run before any work.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding latents {bar:30} {pos}/{len} {eta}")
            .expect("valid template"),
    );
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let cache = out_dir.join(LATENT_CACHE);
    let data = LatentData::load(&config, Split::Train, Some(&cache), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let dims = data.latent_dims()?;
    let trainer = if args.resume {
        let trainer = LdmTrainer::resume(config.clone(), dims, &checkpoint, &device)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), trainer.step);
        trainer
    } else {
        LdmTrainer::new(config.clone(), dims, &device)?
    };
    std::fs::write(out_dir.join("config.toml"), config.to_toml())?;
    eprintln!(
        "training a text encoder and U-Net ({:.2} M parameters) on {} latents {:?} of {} classes, \
         {} steps of batch {}",
        trainer.parameter_count() as f64 / 1e6,
        data.len(),
        dims,
        data.num_classes(),
        config.train.steps,
        config.train.batch_size
    );
    let parameters = trainer.parameter_count();
    let mut run = LdmRun {
        trainer,
        data,
        out_dir: out_dir.clone(),
        pipeline_dtype,
    };
    let summary = run_loop(
        &mut run,
        &LoopSettings {
            out_dir: out_dir.clone(),
            total_steps: config.train.steps,
            log_every: config.train.log_every,
            checkpoint_every: config.train.checkpoint_every,
            sample_every: config.train.sample_every,
            time_limit: limit,
            csv_header: "step,loss,grad_norm,learning_rate,seconds",
            resume: args.resume,
        },
    )?;
    let pipeline = out_dir.join(PIPELINE_DIR);
    if summary.steps_run == 0 {
        // Nothing trained (resumed at the last step): the pipeline is still written, so that
        // `--resume --pipeline-dtype f16` exports a finished run.
        run.trainer.write_pipeline(&pipeline, pipeline_dtype)?;
    }
    eprintln!(
        "{} steps in {:.1} s ({:.2} steps/s); pipeline: {}",
        summary.steps_run,
        summary.seconds,
        summary.steps_run as f64 / summary.seconds.max(1e-9),
        pipeline.display()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "steps": run.trainer.step,
                "steps_run": summary.steps_run,
                "seconds": summary.seconds,
                "steps_per_second": summary.steps_run as f64 / summary.seconds.max(1e-9),
                "final_loss": summary.final_loss,
                "parameters": parameters,
                "checkpoint": checkpoint,
                "pipeline": pipeline,
            })
        );
    }
    Ok(())
}
