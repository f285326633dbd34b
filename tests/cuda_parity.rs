//! Generation on an NVIDIA GPU against the same generation on the CPU and against diffusers:
//! the tiny SD 1.x and SDXL fixture pipelines, text-to-image and img2img, with the GPU set up as
//! `txt2img --device cuda` sets it up (full-precision f32). Built only with `--features cuda`
//! and run on a machine with a GPU (`tests/cuda/run.sh` on a lent one); CI has neither, so there
//! this file compiles to nothing.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::pipeline::request::GenerationRequest;
use diffuse::pipeline::{LoadOptions, StableDiffusion};
use diffuse::sampler::{SamplerKind, SamplerOptions, SchedulerConfig};

fn gpu() -> Device {
    let device = Device::new_cuda(0).expect("this test needs an NVIDIA GPU");
    diffuse::ops::runtime::tune_cuda(&device, diffuse::ops::runtime::F32Matmul::Exact).unwrap();
    device
}

fn load(fixture: &str, device: &Device, dtype: DType) -> StableDiffusion {
    let options = LoadOptions {
        device: device.clone(),
        dtype,
        ..Default::default()
    };
    StableDiffusion::load_dir(&fixture_path(fixture), options).unwrap()
}

/// (3, H, W) images of `request` on `sd`, on the CPU.
fn generate(sd: &StableDiffusion, request: &GenerationRequest) -> Tensor {
    let generation = request.prepare(sd, None).unwrap();
    let out = generation.run(sd, 0, &mut |_| Ok(())).unwrap();
    out.images
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// A `pipe_*` case of a fixture as a request with its recorded latents and scheduler.
fn fixture_request(fx: &Fixture, case: &str) -> GenerationRequest {
    let call: serde_json::Value =
        serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
    let scheduler =
        SchedulerConfig::from_json_str(fx.meta_str(&format!("{case}/scheduler_config"))).unwrap();
    let steps = call
        .get("steps")
        .or(call.get("num_inference_steps"))
        .and_then(|v| v.as_u64())
        .unwrap() as usize;
    GenerationRequest {
        negative: call["negative_prompt"].as_str().map(str::to_string),
        guidance: Some(call["guidance_scale"].as_f64().unwrap()),
        steps: Some(steps),
        sampler: Some(scheduler.class_kind().unwrap().unwrap_or(SamplerKind::Ddim)),
        sampler_options: SamplerOptions {
            eta: call["call_kwargs"]["eta"].as_f64().unwrap_or(0.0),
            ..Default::default()
        },
        scheduler: Some(scheduler),
        latents: fx.tensors.get(&format!("{case}/latents_in")).cloned(),
        seed: Some(0),
        memory_check: false,
        ..GenerationRequest::new(call["prompt"].as_str().unwrap())
    }
}

/// The GPU image within 1e-3 of the CPU image, and both within 1e-3 of diffusers' where the
/// fixture has it.
fn assert_gpu_matches_cpu(
    label: &str,
    fixture: &str,
    request: &GenerationRequest,
    reference: Option<&Tensor>,
) {
    let cpu = generate(&load(fixture, &Device::Cpu, DType::F32), request);
    let gpu = generate(&load(fixture, &gpu(), DType::F32), request);
    let err = max_abs_diff(&cpu, &gpu);
    eprintln!("{label}: GPU vs CPU max |difference| {err:.2e}");
    assert!(err <= 1e-3, "{label}: GPU and CPU images differ by {err:e}");
    if let Some(reference) = reference {
        // diffusers' images are NHWC.
        let ours = gpu.permute((0, 2, 3, 1)).unwrap();
        let err = max_abs_diff(&ours, reference);
        eprintln!("{label}: GPU vs diffusers max |difference| {err:.2e}");
        assert!(
            err <= 1e-3,
            "{label}: GPU and diffusers images differ by {err:e}"
        );
    }
}

#[test]
fn sd_text_to_image_on_the_gpu_matches_the_cpu_and_diffusers() {
    let fx = Fixture::load("model_reference.safetensors");
    for case in ["pipe_ddim", "pipe_euler"] {
        let request = fixture_request(&fx, case);
        assert_gpu_matches_cpu(
            case,
            "tiny-sd",
            &request,
            Some(fx.tensor(&format!("{case}/image"))),
        );
    }
}

#[test]
fn sdxl_text_to_image_on_the_gpu_matches_the_cpu_and_diffusers() {
    let fx = Fixture::load("tiny-sdxl/reference.safetensors");
    for case in ["pipe_euler", "pipe_euler_zero_neg", "pipe_dpmpp_2m_karras"] {
        let request = fixture_request(&fx, case);
        assert_gpu_matches_cpu(
            case,
            "tiny-sdxl",
            &request,
            Some(fx.tensor(&format!("{case}/image"))),
        );
    }
}

#[test]
fn sdxl_img2img_on_the_gpu_matches_the_cpu_and_diffusers() {
    let fx = Fixture::load("sdxl-img2img/reference.safetensors");
    let init = image::open(fixture_path("sdxl-img2img/init.png"))
        .unwrap()
        .to_rgb8();
    for case in ["euler", "dpmpp_2m_karras"] {
        let call: serde_json::Value =
            serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
        let request = GenerationRequest {
            init_image: Some(init.clone()),
            strength: call["strength"].as_f64().unwrap(),
            seed: Some(11),
            ..fixture_request(&fx, case)
        };
        assert_gpu_matches_cpu(
            case,
            "tiny-sdxl",
            &request,
            Some(fx.tensor(&format!("{case}/image"))),
        );
    }
}

/// Half precision on the GPU: finite images near the f32 ones (the tiny models' activations are
/// small, so f16 and bf16 rounding stays within a few 8-bit levels).
#[test]
fn half_precision_on_the_gpu_stays_near_f32() {
    let fx = Fixture::load("tiny-sdxl/reference.safetensors");
    let request = fixture_request(&fx, "pipe_euler");
    let device = gpu();
    let f32_image = generate(&load("tiny-sdxl", &device, DType::F32), &request);
    for dtype in [DType::F16, DType::BF16] {
        let image = generate(&load("tiny-sdxl", &device, dtype), &request);
        let err = max_abs_diff(&f32_image, &image);
        eprintln!("{dtype:?}: max |difference| from f32 {err:.2e}");
        assert!(err.is_finite() && err < 0.05, "{dtype:?}: {err:e}");
    }
}
