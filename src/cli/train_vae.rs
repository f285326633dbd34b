//! `diffuse train-vae --config configs/tiny-vae.toml`: trains the latent autoencoder in the
//! shared loop (`train_loop`: progress, loss CSV and curve, atomic checkpoints, Ctrl-C saving,
//! `--resume`), and writes it in the diffusers `vae/` layout with its latent scaling factor.

use super::train_loop::{
    apply_overrides, check_fresh_start, run_loop, time_limit, LoopSettings, TrainingRun,
};
use crate::data::idx::{LabelledImages, Split};
use crate::pipeline::pixel::grid;
use crate::train::vae::{load_pooled, VaeTrainConfig, VaeTrainer};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct TrainVaeArgs {
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The TOML config (configs/tiny-vae.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides train.out_dir.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Overrides train.steps (the total, counting steps already taken when resuming).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from OUT_DIR/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many minutes of training (saved; `--resume` goes on).
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

const CSV_HEADER: &str =
    "step,loss,l1,kl,adversarial,discriminator,grad_norm,learning_rate,seconds";

struct VaeRun {
    trainer: VaeTrainer,
    data: LabelledImages,
    checkpoint: PathBuf,
}

impl TrainingRun for VaeRun {
    fn step(&self) -> usize {
        self.trainer.step
    }

    fn train_step(&mut self) -> anyhow::Result<Vec<f64>> {
        let s = self.trainer.train_step(&self.data)?;
        Ok(vec![
            s.loss,
            s.reconstruction,
            s.kl,
            s.adversarial,
            s.discriminator,
            s.grad_norm,
            s.learning_rate,
        ])
    }

    fn save(&mut self) -> anyhow::Result<()> {
        Ok(self.trainer.save(&self.checkpoint)?)
    }
}

pub fn run(args: TrainVaeArgs) -> anyhow::Result<()> {
    let mut config = VaeTrainConfig::from_file(&args.config)?;
    apply_overrides(
        &mut config.train.out_dir,
        &mut config.train.steps,
        args.out_dir,
        args.steps,
    )?;
    let limit = time_limit(args.time_limit)?;
    let out_dir = config.train.out_dir.clone();
    let checkpoint = out_dir.join("checkpoint.safetensors");
    check_fresh_start(&checkpoint, args.resume)?;
    // Data first: a bad file stops the run before any work.
    let train = load_pooled(&config.data.paths, Split::Train)?;
    let test = load_pooled(&config.data.paths, Split::Test)?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let device = super::parse_training_device(&args.device)?;
    let trainer = if args.resume {
        let trainer = VaeTrainer::resume(config.clone(), &checkpoint, &device)?;
        eprintln!("resuming {} at step {}", checkpoint.display(), trainer.step);
        trainer
    } else {
        VaeTrainer::new(config.clone(), &device)?
    };
    let total = config.train.steps;
    eprintln!(
        "training a {:.2} M-parameter VAE on {} images ({}x{} padded to {s}x{s}), {total} steps of batch {}",
        trainer.parameter_count() as f64 / 1e6,
        train.len(),
        train.height,
        train.width,
        config.train.batch_size,
        s = config.data.image_size,
    );
    let mut run = VaeRun {
        trainer,
        data: train,
        checkpoint: checkpoint.clone(),
    };
    let summary = run_loop(
        &mut run,
        &LoopSettings {
            out_dir: out_dir.clone(),
            total_steps: total,
            log_every: config.train.log_every,
            checkpoint_every: config.train.checkpoint_every,
            sample_every: 0,
            time_limit: limit,
            csv_header: CSV_HEADER,
            resume: args.resume,
        },
    )?;
    let VaeRun {
        trainer,
        data: train,
        ..
    } = run;
    let (seconds, steps_run) = (summary.seconds, summary.steps_run);
    let (l1, psnr) = trainer.evaluate(&test, 1000)?;
    let scaling_factor = trainer.scaling_factor(&train)?;
    let vae_dir = out_dir.join("vae");
    trainer.write_diffusers(&vae_dir, scaling_factor)?;
    // Eight test images over their reconstructions.
    let originals = crate::train::vae::pad_to(
        &test.batch(&(0..8).collect::<Vec<_>>(), &candle_core::Device::Cpu)?,
        config.data.image_size,
    )?
    .to_device(&device)?;
    let pairs = candle_core::Tensor::cat(
        &[
            originals.clone(),
            trainer.reconstruct(&originals)?.clamp(-1f32, 1f32)?,
        ],
        0,
    )?;
    let grid_path = out_dir.join("reconstructions.png");
    crate::image_io::save_png(&grid(&pairs, 8)?, &grid_path, None)?;
    eprintln!(
        "{steps_run} steps in {seconds:.1} s; test reconstruction L1 {l1:.4}, PSNR {psnr:.2} dB; \
         latent scaling factor {scaling_factor:.4}; wrote {}",
        vae_dir.display()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "steps": trainer.step,
                "steps_run": steps_run,
                "seconds": seconds,
                "final_loss": summary.final_loss,
                "test_l1": l1,
                "test_psnr_db": psnr,
                "scaling_factor": scaling_factor,
                "parameters": trainer.parameter_count(),
                "vae": vae_dir,
                "reconstructions": grid_path,
            })
        );
    }
    Ok(())
}
