//! `diffuse train-judge --config configs/judge-emoji.toml`: trains a classifier that reads
//! generated images (an emoji concept judge tested on a held-out style, or a judge of an IDX
//! dataset's classes), in the shared training session, and writes it as a judge folder.

use super::session_args::{report, start, Cadence, SessionArgs};
use crate::data::captions::ClassesFile;
use crate::data::image_set::ImageSet;
use crate::judge::JudgeShape;
use crate::train::config::judge::JudgeData;
use crate::train::config::JudgeTrainConfig;
use crate::train::judge::{judge_data, JudgeRun, JudgeTrainer};
use crate::train::session::{check_out_dir, run_session};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct TrainJudgeArgs {
    /// The TOML config (configs/judge-emoji.toml); its relative paths are taken from its folder.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub session: SessionArgs,
}

pub fn run(args: TrainJudgeArgs) -> anyhow::Result<()> {
    let mut config = JudgeTrainConfig::from_file(&args.config)?;
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
    let (train, test) = judge_data(&config)?;
    let shape = JudgeShape {
        channels: train.channels,
        size: train.size,
        classes: train.captions.len(),
        widths: config.model.widths,
    };
    let device = args.session.device()?;
    let trainer = start(
        &settings,
        &checkpoint,
        |path| JudgeTrainer::resume(config.clone(), shape, path, &device),
        || JudgeTrainer::new(config.clone(), shape, &device),
        JudgeTrainer::step,
    )?;
    eprintln!(
        "training a {:.2} M-parameter judge of {} classes on {} images ({} channels at {s}x{s}), \
         tested on {}",
        trainer.parameter_count() as f64 / 1e6,
        shape.classes,
        train.len(),
        shape.channels,
        test.len(),
        s = shape.size,
    );
    let mut run = JudgeRun {
        trainer,
        data: train,
    };
    let summary = run_session(&mut run, &settings)?;
    let JudgeRun { trainer, data } = run;
    let train_accuracy = trainer.accuracy(&data)?;
    let test_accuracy = trainer.accuracy(&test)?;
    let judge_dir = out_dir.join("judge");
    let names = class_names(&config, &data)?;
    trainer.write_judge(&judge_dir, &names)?;
    let mut json = report(
        &summary,
        &format!(
            "accuracy {:.1}% on the training images, {:.1}% on the held-out test images; wrote {}",
            100.0 * train_accuracy,
            100.0 * test_accuracy,
            judge_dir.display()
        ),
    );
    if args.session.json {
        for (key, value) in [
            ("train_accuracy", serde_json::json!(train_accuracy)),
            ("test_accuracy", serde_json::json!(test_accuracy)),
            ("test_images", serde_json::json!(test.len())),
            ("classes", serde_json::json!(shape.classes)),
            ("parameters", serde_json::json!(trainer.parameter_count())),
            ("judge", serde_json::json!(judge_dir)),
        ] {
            json.insert(key.into(), value);
        }
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}

/// The names a judge folder gives its classes: an IDX dataset's own class names ("cat",
/// "Sneaker") from its `classes.json`, an emoji concept's `text`; a class of a folder without
/// `classes.json` is named by its label.
fn class_names(config: &JudgeTrainConfig, data: &ImageSet) -> anyhow::Result<Vec<String>> {
    if let JudgeData::Idx { path } = &config.data {
        let classes = path.join("classes.json");
        if classes.is_file() {
            return Ok(ClassesFile::read(&classes)?.classes);
        }
    }
    Ok(data
        .captions
        .iter()
        .enumerate()
        .map(|(label, c)| c.first().cloned().unwrap_or_else(|| label.to_string()))
        .collect())
}
