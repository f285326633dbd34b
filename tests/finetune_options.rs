//! The fine-tuning step's options: gradient accumulation is the same step as one larger batch;
//! the weight average is what the output holds; min-SNR weights and offset noise are what
//! their definitions say; mirrored images are mirrored.

mod common;

use common::{fixture_path, max_abs_diff};
use diffuse::data::folder::{FolderOptions, ImageFolder};
use diffuse::diffusion::schedule::{min_snr_weights, BetaSchedule, NoiseSchedule, PredictionType};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::sampler::SeededNoise;
use diffuse::train::finetune::{mirror, offset_noise, FineTuner, FinetuneSettings};
use image::{DynamicImage, ImageBuffer, Rgb};
use std::path::PathBuf;

fn folder(name: &str) -> (PathBuf, ImageFolder) {
    let dir = std::env::temp_dir().join(format!("diffuse-ft-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (stem, colour) in [
        ("a", [200u8, 40, 40]),
        ("b", [40, 40, 200]),
        ("c", [40, 160, 40]),
    ] {
        let image = ImageBuffer::from_fn(32, 32, |x, y| {
            if (x + 2 * y) % 8 < 4 {
                Rgb(colour)
            } else {
                Rgb([255, 255, 255])
            }
        });
        DynamicImage::ImageRgb8(image)
            .save(dir.join(format!("{stem}.png")))
            .unwrap();
        std::fs::write(dir.join(format!("{stem}.txt")), format!("pattern {stem}")).unwrap();
    }
    let scanned = ImageFolder::scan(&dir, &FolderOptions::default()).unwrap();
    (dir, scanned)
}

#[test]
fn accumulated_passes_make_the_same_step_as_one_batch() {
    let root = fixture_path("tiny-sd");
    let sd = StableDiffusion::load_dir(&root, LoadOptions::default()).unwrap();
    let (dir, data) = folder("accumulate");
    let base = FinetuneSettings {
        resolution: 32,
        lora_rank: None,
        learning_rate: 1e-3,
        min_snr_gamma: Some(5.0),
        noise_offset: 0.05,
        random_flip: true,
        seed: 3,
        ..Default::default()
    };
    let one_batch = FinetuneSettings {
        batch_size: 4,
        ..base.clone()
    };
    let accumulated = FinetuneSettings {
        batch_size: 2,
        gradient_accumulation: 2,
        ..base
    };
    let unet_dir = root.join("unet");
    let (mut a, _) = FineTuner::new(&sd, &unet_dir, &data, one_batch).unwrap();
    let (mut b, _) = FineTuner::new(&sd, &unet_dir, &data, accumulated).unwrap();
    let (sa, sb) = (a.train_step().unwrap(), b.train_step().unwrap());
    assert!(
        (sa.loss - sb.loss).abs() <= 1e-5 * sa.loss,
        "loss {} vs {}",
        sa.loss,
        sb.loss
    );
    assert!(
        (sa.grad_norm - sb.grad_norm).abs() <= 1e-4 * sa.grad_norm,
        "gradient norm {} vs {}",
        sa.grad_norm,
        sb.grad_norm
    );
    // Adam's first step moves each weight by about the learning rate; the two may differ only
    // by rounding in the gradient sums.
    for ((name, wa), (_, wb)) in a.weights().unwrap().iter().zip(b.weights().unwrap()) {
        let diff = max_abs_diff(wa, &wb);
        assert!(diff < 1e-4, "{name}: weights differ by {diff}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_output_is_the_weight_average_when_there_is_one() {
    let root = fixture_path("tiny-sd");
    let sd = StableDiffusion::load_dir(&root, LoadOptions::default()).unwrap();
    let (dir, data) = folder("ema");
    let settings = FinetuneSettings {
        resolution: 32,
        lora_rank: Some(2),
        learning_rate: 1e-2,
        ema_decay: Some(0.5),
        seed: 1,
        ..Default::default()
    };
    let (mut tuner, _) = FineTuner::new(&sd, &root.join("unet"), &data, settings).unwrap();
    // The warm-up decay min(0.5, (1 + k) / (10 + k)) is 0.1 and 2/11 for steps 0 and 1, so
    // after two steps the average is the direct recurrence from the starting weights.
    let start = tuner.weights().unwrap();
    tuner.train_step().unwrap();
    let after_one = tuner.weights().unwrap();
    tuner.train_step().unwrap();
    let after_two = tuner.weights().unwrap();
    let output = tuner.trainer.output_weights().unwrap();
    let mut changed = 0;
    for i in 0..start.len() {
        let first = ((&start[i].1 * 0.1).unwrap() + (&after_one[i].1 * 0.9).unwrap()).unwrap();
        let d = 2.0 / 11.0;
        let expected = ((first * d).unwrap() + (&after_two[i].1 * (1.0 - d)).unwrap()).unwrap();
        let diff = max_abs_diff(&expected, &output[i].1);
        assert!(diff < 1e-6, "{}: average off by {diff}", output[i].0);
        if max_abs_diff(&output[i].1, &after_two[i].1) > 0.0 {
            changed += 1;
        }
    }
    assert!(changed > 0, "the average equals the last weights");
    let out = dir.join("out");
    let file = tuner.write_output(&root, &out).unwrap();
    let written = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    for (name, average) in &output {
        let saved = &written[&format!("unet.{name}")];
        assert_eq!(
            max_abs_diff(saved, average),
            0.0,
            "{name} is not the average"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn min_snr_weights_cap_the_x0_space_weight_at_gamma() {
    let schedule = NoiseSchedule::new(
        &BetaSchedule::ScaledLinear {
            beta_start: 0.00085,
            beta_end: 0.012,
        },
        1000,
        false,
    )
    .unwrap();
    let timesteps: Vec<usize> = (0..1000).step_by(37).collect();
    let gamma = 5.0;
    for prediction in [
        PredictionType::Epsilon,
        PredictionType::VPrediction,
        PredictionType::Sample,
    ] {
        let weights = min_snr_weights(&schedule, prediction, gamma, &timesteps);
        for (t, w) in timesteps.iter().zip(weights) {
            let alpha_bar = schedule.alphas_cumprod[*t];
            let snr = alpha_bar / (1.0 - alpha_bar);
            // The x_0-space loss is SNR times the epsilon loss and SNR / (SNR + 1) times the
            // v loss: converting back must give min(SNR, gamma).
            let x0_weight = match prediction {
                PredictionType::Epsilon => w * snr,
                PredictionType::VPrediction => w * (snr + 1.0),
                _ => w,
            };
            let expected = snr.min(gamma);
            assert!(
                (x0_weight - expected).abs() <= 1e-9 * expected.max(1.0),
                "{prediction:?} t={t}: {x0_weight} vs {expected}"
            );
        }
    }
    // Noisy steps (SNR below gamma) keep the plain epsilon loss.
    let last = min_snr_weights(&schedule, PredictionType::Epsilon, gamma, &[999]);
    assert_eq!(last, vec![1.0]);
}

#[test]
fn offset_noise_shifts_each_channel_by_its_offset() {
    let mut rng = SeededNoise::new(4);
    let noise = rng.randn(&[2, 4, 8, 8]).unwrap();
    let offsets = rng.randn(&[2, 4, 1, 1]).unwrap();
    let shifted = offset_noise(&noise, &offsets, 0.1).unwrap();
    let shift = (shifted - &noise).unwrap();
    let expected = (offsets * 0.1).unwrap().broadcast_as((2, 4, 8, 8)).unwrap();
    assert!(max_abs_diff(&shift, &expected) < 1e-6);
}

#[test]
fn mirror_reverses_columns() {
    let image = candle_core::Tensor::arange(0f32, 24., &candle_core::Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let mirrored = mirror(&image).unwrap();
    let rows: Vec<Vec<Vec<f32>>> = mirrored.to_vec3().unwrap();
    assert_eq!(rows[0][0], vec![3., 2., 1., 0.]);
    assert_eq!(rows[1][2], vec![23., 22., 21., 20.]);
    assert_eq!(
        max_abs_diff(&mirror(&mirrored).unwrap(), &image),
        0.0,
        "mirroring twice is the identity"
    );
}
