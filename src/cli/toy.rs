//! `diffuse toy swiss-roll`: Sohl-Dickstein et al. 2015, figure 1, on the CPU in seconds.

use super::sampler_args::SamplerTuning;
use crate::sampler::SamplerKind;
use crate::toy;
use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ToyProblem {
    /// The 2-D swiss roll.
    SwissRoll,
}

#[derive(Debug, Clone, Args)]
pub struct ToyArgs {
    #[arg(value_enum)]
    pub problem: ToyProblem,
    /// Sampler, or a comma-separated list to compare.
    #[arg(long, default_value = "ddpm")]
    pub sampler: String,
    /// Sampling steps, or a comma-separated list.
    #[arg(long, default_value = "100")]
    pub steps: String,
    #[command(flatten)]
    pub tuning: SamplerTuning,
    /// Training steps of the MLP.
    #[arg(long, default_value_t = 4000)]
    pub train_steps: usize,
    /// Points sampled and compared with the data.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The trajectory picture (forward row, reverse row).
    #[arg(long, default_value = "swiss-roll.png")]
    pub output: PathBuf,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

fn parse_list<T>(
    text: &str,
    what: &str,
    parse: impl Fn(&str) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let items: Vec<T> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!items.is_empty(), "{what} is empty");
    Ok(items)
}

pub fn run(args: ToyArgs) -> anyhow::Result<()> {
    // The MLP's matrices are tiny, so candle's second worker thread only adds synchronisation:
    // measured 1.4x faster training with one. candle reads this variable when it sizes its pool,
    // which happens at the first tensor op, after this point.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let ToyProblem::SwissRoll = args.problem;
    let kinds = parse_list(&args.sampler, "--sampler", |s| Ok(SamplerKind::parse(s)?))?;
    let step_counts = parse_list(&args.steps, "--steps", |s| {
        s.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("--steps = {s} is not allowed; expected a positive integer")
        })
    })?;
    anyhow::ensure!(
        args.samples >= 2,
        "--samples = {} is not allowed; expected at least 2",
        args.samples
    );
    anyhow::ensure!(
        args.train_steps >= 1,
        "--train-steps = 0 is not allowed; expected at least 1"
    );
    let options = args.tuning.options();
    let scheduler_config = toy::toy_scheduler_config();
    // Check every combination before spending time on training.
    for kind in &kinds {
        for steps in &step_counts {
            crate::sampler::build_sampler(*kind, &scheduler_config, &options, *steps)?;
        }
    }
    let schedule = scheduler_config.noise_schedule()?;
    let config = toy::ToyConfig {
        train_steps: args.train_steps,
        seed: args.seed,
        ..Default::default()
    };

    let bar = ProgressBar::new(config.train_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("training {bar:30} {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let trained = toy::train(&config, &schedule, |step, loss| {
        if step % 50 == 0 {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
        }
    })?;
    bar.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "trained {} steps in {train_seconds:.1} s, final loss {:.4}",
        config.train_steps, trained.final_loss
    );

    let mut data_noise = crate::sampler::SeededNoise::new(args.seed.wrapping_add(1000));
    let data_a = toy::swiss_roll(args.samples, &mut data_noise);
    let data_b = toy::swiss_roll(args.samples, &mut data_noise);
    let data_distance = toy::sliced_wasserstein(&data_a, &data_b, 256, 0);
    // The starting point of every sampler, N(0, I): how far an untrained model would stay.
    let gaussian: Vec<[f32; 2]> = data_noise
        .normals(2 * args.samples)
        .chunks(2)
        .map(|p| [p[0], p[1]])
        .collect();
    let noise_distance = toy::sliced_wasserstein(&gaussian, &data_a, 256, 0);

    let mut results = Vec::new();
    let mut picture_trajectory = None;
    for kind in &kinds {
        for steps in &step_counts {
            let started = Instant::now();
            let out = toy::sample(
                &trained.model,
                *kind,
                &options,
                *steps,
                args.samples,
                args.seed.wrapping_add(2000),
                &[200.0, 75.0, 25.0],
            )?;
            let seconds = started.elapsed().as_secs_f64();
            let distance = toy::sliced_wasserstein(&out.samples, &data_a, 256, 0);
            println!(
                "{:>9} {:>4} steps: distance {distance:.4} (data vs data {data_distance:.4}), {} evaluations, {seconds:.2} s",
                kind.cli_name(),
                steps,
                out.evaluations
            );
            results.push(serde_json::json!({
                "sampler": kind.cli_name(),
                "steps": steps,
                "distance": distance,
                "evaluations": out.evaluations,
                "seconds": seconds,
            }));
            picture_trajectory.get_or_insert(out.trajectory);
        }
    }

    // The reverse row mirrors the forward one: t = 999, 200, 75, 25, 0.
    let forward = toy::forward_trajectory(&schedule, &data_a, &[0, 25, 75, 200, 999], args.seed)?;
    let reverse = picture_trajectory.expect("at least one run");
    let image = toy::scatter_grid(&[forward, reverse], 200);
    image
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("wrote {}", args.output.display());

    if args.json {
        let first = &results[0];
        let summary = serde_json::json!({
            "problem": "swiss-roll",
            "sampler": first["sampler"],
            "steps": first["steps"],
            "distance": first["distance"],
            "data_distance": data_distance,
            "noise_distance": noise_distance,
            "evaluations": first["evaluations"],
            "train_steps": config.train_steps,
            "train_seconds": train_seconds,
            "final_loss": trained.final_loss,
            "output": args.output.display().to_string(),
            "results": results,
        });
        println!("{summary}");
    }
    Ok(())
}
