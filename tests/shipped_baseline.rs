//! The MNIST baseline shipped in weights/ draws the digits it is asked for: 20 DDIM-20 samples,
//! two of each class, judged by the public MNIST classifier.

mod common;

use common::fixture_path;
use diffuse::judge::Judge;
use diffuse::pipeline::pixel::{PixelDiffusion, WeightsChoice};
use diffuse::sampler::{SamplerKind, SamplerOptions};
use std::path::Path;

#[test]
fn the_shipped_mnist_baseline_draws_the_requested_digits() {
    let device = candle_core::Device::Cpu;
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/ddpm-mnist.safetensors");
    let model = PixelDiffusion::load(&weights, WeightsChoice::Ema, &device).unwrap();
    assert_eq!(model.num_classes(), Some(10));
    let labels: Vec<u32> = (0..20).map(|i| i % 10).collect();
    let images = model
        .sample(
            SamplerKind::Ddim,
            &SamplerOptions::default(),
            20,
            labels.len(),
            Some(&labels),
            0,
            &mut |_, _| {},
        )
        .unwrap();
    let judge = Judge::load(&fixture_path("judges/mnist"), &device).unwrap();
    let accuracy = judge.score(&images).unwrap().accuracy(&labels).unwrap();
    // 95.9% of 1000 DDIM-50 samples are judged the requested class; 20 samples at 20 steps
    // leave room for two misses.
    assert!(accuracy >= 0.9, "judge accuracy {accuracy}");
}
