//! Training a judge: the small classifier (`judge::Judge`) that reads generated images as one of
//! a dataset's classes, with the cross-entropy loss, in the training session. A judge trained on
//! some emoji styles and tested on another says how well it reads a concept drawn in a way it
//! never saw, which is what reading a generated picture asks of it.

use super::config::judge::{JudgeData, JudgeTrainConfig};
use super::optim::{AdamWParams, LrSchedule};
use super::state::{TrainerKind, TrainerState, UpdateRule};
use super::{named_vars, seeded_init};
use crate::data::idx::Split;
use crate::data::image_set::{ImageSet, ImageSources};
use crate::error::Result;
use crate::judge::{Judge, JudgeShape};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::BTreeMap;
use std::path::Path;

/// The training and test images of a judge config, their classes the labels.
pub fn judge_data(config: &JudgeTrainConfig) -> Result<(ImageSet, ImageSet)> {
    match &config.data {
        JudgeData::Emoji {
            path,
            train_styles,
            test_styles,
            background,
            image_size,
            channels,
        } => Ok((
            ImageSet::emoji_concepts(path, train_styles, *image_size, *channels, *background)?,
            ImageSet::emoji_concepts(path, test_styles, *image_size, *channels, *background)?,
        )),
        JudgeData::Idx { path } => {
            let sources = ImageSources {
                idx: vec![path.clone()],
                emoji: vec![],
                emoji_repeat: 1,
                per_class_limit: None,
            };
            let size = crate::data::idx::LabelledImages::load(path, Split::Test)?.height;
            let load = |split| ImageSet::load(&sources, split, size, 1, [0; 3], false);
            Ok((load(Split::Train)?, load(Split::Test)?))
        }
    }
}

/// How one training picture is moved: by (dy, dx) pixels, mirrored or not.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Augment {
    dy: isize,
    dx: isize,
    flip: bool,
}

impl Augment {
    fn draw(rng: &mut impl rand::Rng, shift: usize, flip: bool) -> Self {
        let s = shift as i64;
        Self {
            dy: rng.random_range(-s..=s) as isize,
            dx: rng.random_range(-s..=s) as isize,
            flip: flip && rng.random_bool(0.5),
        }
    }
}

/// (B, C, S, S) pictures each moved as `moves` says: content shifted by (dy, dx) with the edge
/// pixels repeated into the gap, then mirrored left to right where asked.
fn augment(x: &Tensor, moves: &[Augment]) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad = moves
        .iter()
        .map(|m| m.dy.unsigned_abs().max(m.dx.unsigned_abs()))
        .max()
        .unwrap_or(0);
    let padded = x.pad_with_same(2, pad, pad)?.pad_with_same(3, pad, pad)?;
    let reversed = Tensor::from_vec((0..w as u32).rev().collect::<Vec<_>>(), w, x.device())?;
    let pictures = moves
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let moved = padded
                .get(i)?
                .narrow(1, (pad as isize - m.dy) as usize, h)?
                .narrow(2, (pad as isize - m.dx) as usize, w)?;
            if m.flip {
                moved.contiguous()?.index_select(&reversed, 2)
            } else {
                Ok(moved)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&pictures, 0)?)
}

/// A judge being trained.
pub struct JudgeTrainer {
    pub config: JudgeTrainConfig,
    judge: Judge,
    _varmap: VarMap,
    state: TrainerState,
    device: Device,
}

impl JudgeTrainer {
    /// A fresh judge of `shape`, initialised from the config's seed.
    pub fn new(config: JudgeTrainConfig, shape: JudgeShape, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let judge = Judge::new(shape, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let named = named_vars(&varmap);
        seeded_init(
            &named,
            &mut crate::sampler::SeededNoise::new(config.train.seed),
            &|_| false,
        )?;
        let t = &config.train;
        let rule = UpdateRule {
            learning_rate: LrSchedule::constant(t.learning_rate, t.warmup_steps),
            grad_clip: t.grad_clip,
            adamw: AdamWParams::default(),
        };
        Ok(Self {
            state: TrainerState::new(named, rule, None)?,
            judge,
            _varmap: varmap,
            device: device.clone(),
            config,
        })
    }

    /// Continues from [`Self::save`]'s checkpoint; one of another config or shape is refused.
    pub fn resume(
        config: JudgeTrainConfig,
        shape: JudgeShape,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let mut trainer = Self::new(config, shape, device)?;
        let (loaded, step) = super::state::open_for_resume(
            path,
            device,
            TrainerKind::Judge,
            &trainer.config.to_toml(),
            &["data", "model"],
            |saved| Ok(JudgeTrainConfig::from_toml_str(saved)?.to_toml()),
        )?;
        trainer.state.restore(&loaded, path, step)?;
        Ok(trainer)
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn parameter_count(&self) -> usize {
        self.state.parameter_count()
    }

    /// One step of the cross-entropy loss on a batch drawn from `data`; (loss, accuracy of the
    /// batch, gradient norm, learning rate).
    pub fn train_step(&mut self, data: &ImageSet) -> Result<[f64; 4]> {
        let t = &self.config.train;
        let (mut rng, indices, _) = super::draw_examples_and_timesteps(
            t.seed,
            self.state.step,
            t.batch_size,
            data.len(),
            1,
        );
        let x = data.batch(&indices, &Device::Cpu)?;
        let x = if t.augment_shift > 0 || t.augment_flip {
            let moves: Vec<Augment> = (0..indices.len())
                .map(|_| Augment::draw(rng.rng(), t.augment_shift, t.augment_flip))
                .collect();
            augment(&x, &moves)?
        } else {
            x
        };
        let x = x.to_device(&self.device)?;
        let labels: Vec<u32> = indices.iter().map(|&i| data.class_of(i) as u32).collect();
        let labels = Tensor::from_vec(labels, indices.len(), &self.device)?;
        let logits = self.judge.forward(&x)?.logits;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let correct = logits
            .argmax(1)?
            .eq(&labels)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        let (value, grads) = super::checked_loss_backward(&loss, self.state.step)?;
        let applied = self.state.apply(&grads)?;
        Ok([value, correct, applied.grad_norm, applied.learning_rate])
    }

    /// The share of `data`'s images the judge reads as their class.
    pub fn accuracy(&self, data: &ImageSet) -> Result<f64> {
        let all: Vec<usize> = (0..data.len()).collect();
        let mut correct = 0usize;
        for chunk in all.chunks(500) {
            let x = data.batch(chunk, &Device::Cpu)?.to_device(&self.device)?;
            let predicted = self.judge.forward(&x)?.logits.argmax(1)?.to_vec1::<u32>()?;
            correct += chunk
                .iter()
                .zip(predicted)
                .filter(|(&i, p)| data.class_of(i) as u32 == *p)
                .count();
        }
        Ok(correct as f64 / data.len().max(1) as f64)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        super::state::save_checkpoint(
            path,
            TrainerKind::Judge,
            self.state.step,
            &self.config.to_toml(),
            &self.state.checkpoint_tensors(),
        )
    }

    /// A judge folder: `model.safetensors` (what `Judge::load` reads) and `classes.json` (the
    /// class names by label).
    pub fn write_judge(&self, dir: &Path, class_names: &[String]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::file_error(dir, e.to_string()))?;
        crate::checkpoint::save(
            &dir.join("model.safetensors"),
            &self.state.weights()?,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )?;
        let classes = serde_json::json!({ "classes": class_names });
        crate::checkpoint::write_atomically(
            &dir.join("classes.json"),
            serde_json::to_string_pretty(&classes)
                .expect("names serialise")
                .as_bytes(),
        )
    }
}

/// A judge run in a training session.
pub struct JudgeRun {
    pub trainer: JudgeTrainer,
    pub data: ImageSet,
}

impl super::session::Trainer for JudgeRun {
    fn step(&self) -> usize {
        self.trainer.step()
    }

    fn columns(&self) -> &'static [&'static str] {
        &["loss", "batch_accuracy", "grad_norm", "learning_rate"]
    }

    fn train_step(&mut self) -> Result<Vec<f64>> {
        Ok(self.trainer.train_step(&self.data)?.to_vec())
    }

    fn save(&mut self, out_dir: &Path) -> Result<()> {
        self.trainer
            .save(&out_dir.join(super::session::CHECKPOINT_FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augment_shifts_with_edge_pixels_and_mirrors() {
        // One 1x3x3 picture with values 0..9, row-major.
        let x = Tensor::arange(0f32, 9.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let rows = |m: Augment| -> Vec<Vec<f32>> {
            augment(&x, &[m])
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let still = Augment {
            dy: 0,
            dx: 0,
            flip: false,
        };
        assert_eq!(rows(still), [[0., 1., 2.], [3., 4., 5.], [6., 7., 8.]]);
        // Content moves one down and one right; the top row and left column repeat the edge.
        let moved = Augment {
            dy: 1,
            dx: 1,
            flip: false,
        };
        assert_eq!(rows(moved), [[0., 0., 1.], [0., 0., 1.], [3., 3., 4.]]);
        let mirrored = Augment {
            dy: 0,
            dx: 0,
            flip: true,
        };
        assert_eq!(rows(mirrored), [[2., 1., 0.], [5., 4., 3.], [8., 7., 6.]]);
        let up_left = Augment {
            dy: -1,
            dx: -1,
            flip: false,
        };
        assert_eq!(rows(up_left), [[4., 5., 5.], [7., 8., 8.], [7., 8., 8.]]);
    }
}
