//! A fine-tune interrupted, saved and resumed ends with exactly the weights of an uninterrupted
//! one (LoRA and full); a checkpoint saved with other settings, or truncated, is refused,
//! naming it.

mod common;

use common::fixture_path;
use diffuse::data::folder::{FolderOptions, ImageFolder};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::train::finetune::{FineTuner, FinetuneSettings};
use image::{DynamicImage, ImageBuffer, Rgb};
use std::path::PathBuf;

fn folder() -> (PathBuf, ImageFolder) {
    let dir = std::env::temp_dir().join(format!("diffuse-ft-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, colour) in [("a", [200u8, 40, 40]), ("b", [40, 40, 200])] {
        let image = ImageBuffer::from_fn(40, 32, |x, _| {
            if x % 8 < 4 {
                Rgb(colour)
            } else {
                Rgb([255, 255, 255])
            }
        });
        DynamicImage::ImageRgb8(image)
            .save(dir.join(format!("{name}.png")))
            .unwrap();
        std::fs::write(dir.join(format!("{name}.txt")), format!("stripes {name}")).unwrap();
    }
    let scanned = ImageFolder::scan(&dir, &FolderOptions::default()).unwrap();
    (dir, scanned)
}

/// LoRA runs with every option of the step on (feed-forward adapters, accumulation, min-SNR,
/// noise offset, flips, EMA), so resuming is checked with each piece of state they add.
fn settings(lora_rank: Option<usize>) -> FinetuneSettings {
    let lora = lora_rank.is_some();
    FinetuneSettings {
        lora_feed_forward: lora,
        gradient_accumulation: if lora { 2 } else { 1 },
        min_snr_gamma: lora.then_some(5.0),
        noise_offset: if lora { 0.1 } else { 0.0 },
        ema_decay: lora.then_some(0.9),
        random_flip: lora,
        resolution: 32,
        lora_rank,
        learning_rate: 1e-3,
        warmup_steps: 2,
        batch_size: 2,
        grad_clip: 1.0,
        seed: 5,
    }
}

#[test]
fn resumed_finetune_equals_uninterrupted_one() {
    let root = fixture_path("tiny-sd");
    let sd = StableDiffusion::load_dir(&root, LoadOptions::default()).unwrap();
    let (dir, data) = folder();
    let unet_dir = root.join("unet");
    for rank in [Some(2), None] {
        let (mut straight, _) = FineTuner::new(&sd, &unet_dir, &data, settings(rank)).unwrap();
        for _ in 0..4 {
            straight.train_step().unwrap();
        }
        let (mut first, _) = FineTuner::new(&sd, &unet_dir, &data, settings(rank)).unwrap();
        for _ in 0..2 {
            first.train_step().unwrap();
        }
        let checkpoint = dir.join("checkpoint.safetensors");
        first.save_checkpoint(&checkpoint).unwrap();
        let (mut resumed, _) = FineTuner::new(&sd, &unet_dir, &data, settings(rank)).unwrap();
        resumed.resume_from(&checkpoint).unwrap();
        assert_eq!(resumed.step(), 2);
        for _ in 0..2 {
            resumed.train_step().unwrap();
        }
        let all = |t: &FineTuner| {
            let mut weights = t.weights().unwrap();
            weights.extend(t.trainer.output_weights().unwrap());
            weights
        };
        for ((name, a), (_, b)) in all(&straight).iter().zip(all(&resumed)) {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{rank:?}: {name} differs after resuming");
        }

        let mut other = settings(rank);
        other.seed = 6;
        let (mut mismatched, _) = FineTuner::new(&sd, &unet_dir, &data, other).unwrap();
        let err = mismatched.resume_from(&checkpoint).unwrap_err().to_string();
        assert!(
            err.contains("finetune.seed (checkpoint: 5, this run: 6)"),
            "{err}"
        );

        // A truncated checkpoint is refused by name, and the tuner is left as it was.
        let bytes = std::fs::read(&checkpoint).unwrap();
        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let (mut fresh, _) = FineTuner::new(&sd, &unet_dir, &data, settings(rank)).unwrap();
        let err = fresh.resume_from(&truncated).unwrap_err().to_string();
        assert!(err.contains("truncated.safetensors"), "{err}");
        assert_eq!(fresh.step(), 0);
    }
    std::fs::remove_dir_all(&dir).ok();
}
