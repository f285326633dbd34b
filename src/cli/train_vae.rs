//! `diffuse train-vae --config configs/tiny-vae.toml`: trains the latent autoencoder in the
//! shared loop (`train_loop`: progress, loss CSV and curve, atomic checkpoints, Ctrl-C saving,
//! `--resume`), and writes it in the diffusers `vae/` layout with its latent scaling factor.

use super::session_args::{report, start, Cadence, SessionArgs};
use crate::data::idx::Split;
use crate::data::image_set::ImageSet;
use crate::pipeline::pixel::grid;
use crate::train::config::VaeTrainConfig;
use crate::train::session::{check_out_dir, run_session};
use crate::train::vae::{VaeRun, VaeTrainer};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct TrainVaeArgs {
    /// The TOML config (configs/tiny-vae.toml); its relative paths are taken from its folder.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub session: SessionArgs,
}

pub fn run(args: TrainVaeArgs) -> anyhow::Result<()> {
    let mut config = VaeTrainConfig::from_file(&args.config)?;
    let cadence = Cadence {
        log_every: config.train.log_every,
        checkpoint_every: config.train.checkpoint_every,
        sample_every: 0,
    };
    let train = &mut config.train;
    let settings = args
        .session
        .apply(&mut train.out_dir, &mut train.steps, cadence)?;
    let out_dir = settings.out_dir.clone();
    let checkpoint = check_out_dir(&out_dir, settings.resume)?;
    // Data first: a bad file stops the run before any work.
    let load = |split| {
        ImageSet::load(
            &config.data.sources(),
            split,
            config.data.image_size,
            config.model.channels,
            config.data.background,
            false,
        )
    };
    let train = load(Split::Train)?;
    let test = load(Split::Test)?;
    let device = args.session.device()?;
    let trainer = start(
        &settings,
        &checkpoint,
        |path| VaeTrainer::resume(config.clone(), path, &device),
        || VaeTrainer::new(config.clone(), &device),
        VaeTrainer::step,
    )?;
    let total = settings.total_steps;
    eprintln!(
        "training a {:.2} M-parameter VAE on {} images ({} channels at {s}x{s}), {total} steps \
         of batch {}",
        trainer.parameter_count() as f64 / 1e6,
        train.len(),
        train.channels,
        config.train.batch_size,
        s = config.data.image_size,
    );
    let mut run = VaeRun {
        trainer,
        data: train,
    };
    let summary = run_session(&mut run, &settings)?;
    let VaeRun {
        trainer,
        data: train,
    } = run;
    let (l1, psnr) = trainer.evaluate(&test, 1000)?;
    let scaling_factor = trainer.scaling_factor(&train)?;
    let vae_dir = out_dir.join("vae");
    trainer.write_diffusers(&vae_dir, scaling_factor)?;
    // Eight test images, spread over the sources, over their reconstructions.
    let originals = test
        .batch(
            &crate::train::vae::evenly_spaced(test.len(), 8),
            &candle_core::Device::Cpu,
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
    let mut json = report(
        &summary,
        &format!(
            "test reconstruction L1 {l1:.4}, PSNR {psnr:.2} dB; latent scaling factor \
             {scaling_factor:.4}; wrote {}",
            vae_dir.display()
        ),
    );
    if args.session.json {
        for (key, value) in [
            ("test_l1", serde_json::json!(l1)),
            ("test_psnr_db", serde_json::json!(psnr)),
            ("scaling_factor", serde_json::json!(scaling_factor)),
            ("parameters", serde_json::json!(trainer.parameter_count())),
            ("vae", serde_json::json!(vae_dir)),
            ("reconstructions", serde_json::json!(grid_path)),
        ] {
            json.insert(key.into(), value);
        }
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}
