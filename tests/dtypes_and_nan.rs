//! Half-precision runs stay close to float32, and a NaN in the latents is reported with the
//! step where it appeared.

mod common;

use candle_core::DType;
use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::pipeline::txt2img::{txt2img, Txt2ImgRequest};
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::sampler::{build_sampler, SamplerKind, SamplerOptions, StepEvent};

fn request(latents: candle_core::Tensor) -> Txt2ImgRequest {
    Txt2ImgRequest {
        latents: Some(latents),
        ..Txt2ImgRequest::new("a photo of a cat", 128, 128)
    }
}

fn run(dtype: DType, latents: candle_core::Tensor) -> diffuse::Result<candle_core::Tensor> {
    let options = LoadOptions {
        dtype,
        ..Default::default()
    };
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sd"), options)?;
    let sampler = build_sampler(
        SamplerKind::Ddim,
        &sd.scheduler,
        &SamplerOptions::default(),
        4,
    )?;
    let out = txt2img(
        &sd,
        sampler.as_ref(),
        &request(latents),
        &mut |_: &StepEvent| Ok(()),
    )?;
    Ok(out.images)
}

/// The tolerance scales with the unit roundoff: 2^-11 for f16, 2^-8 (8x more) for bf16; guidance
/// 7.5 amplifies the difference between the two halves of each step. Measured: f16 max 0.0068
/// mean 0.0009; bf16 max 0.10 mean 0.0092 with bf16 activations throughout (CPUs without
/// AVX512_BF16), max 0.026 mean 0.0028 where the pair-dot kernels keep f32 activations between
/// the products (`ops::gemm_bf16`).
#[test]
fn half_precision_images_stay_close_to_float32() {
    let fx = Fixture::load("model_reference.safetensors");
    let latents = fx.tensor("pipe_ddim/latents_in").clone();
    let reference = run(DType::F32, latents.clone()).unwrap();
    for (dtype, max_tol, mean_tol) in [(DType::F16, 0.02, 0.002), (DType::BF16, 0.16, 0.016)] {
        let image = run(dtype, latents.clone()).unwrap();
        let max = max_abs_diff(&image, &reference);
        let mean = (&image - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{dtype:?}: max {max:.4}, mean {mean:.5}");
        assert!(
            max < max_tol && (mean as f64) < mean_tol,
            "{dtype:?}: max {max}, mean {mean}"
        );
    }
}

#[test]
fn nan_latents_are_reported_with_the_step() {
    let fx = Fixture::load("model_reference.safetensors");
    let latents = fx.tensor("pipe_ddim/latents_in");
    let nan = (latents * f64::NAN).unwrap();
    let err = run(DType::F32, nan).expect_err("NaN must fail").to_string();
    assert!(err.contains("NaN") && err.contains("step 1"), "{err}");
}
