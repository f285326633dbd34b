//! SDXL against diffusers on the tiny SDXL pipeline (`tests/fixtures/tiny-sdxl`, copied from
//! the shared fixtures; its README says what each reference tensor is): token ids of both
//! tokenizers, prompt and pooled embeddings, the U-Net with added conditions, and whole
//! `txt2img` runs (negative prompt, zeroed negative, micro-conditioning, DPM++ 2M Karras).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_png_matches, fixture_path, max_abs_diff, run_fixture_case, Fixture};
use diffuse::model::unet::{TextTimeConditioning, UNetConditioning};
use diffuse::pipeline::{LoadOptions, PipelineKind, StableDiffusion};

fn fixture() -> Fixture {
    Fixture::load("tiny-sdxl/reference.safetensors")
}

fn pipeline() -> StableDiffusion {
    StableDiffusion::load_dir(&fixture_path("tiny-sdxl"), LoadOptions::default()).unwrap()
}

fn prompts(fx: &Fixture) -> Vec<String> {
    serde_json::from_str(fx.meta_str("text/prompts")).unwrap()
}

#[test]
fn tokens_and_text_embeddings_match_diffusers() {
    let fx = fixture();
    let sd = pipeline();
    assert_eq!(sd.kind, PipelineKind::StableDiffusionXl);
    assert!(sd.force_zeros_for_empty_prompt);
    let ids_1: Vec<Vec<i64>> = fx.tensor("text/input_ids").to_vec2().unwrap();
    let ids_2: Vec<Vec<i64>> = fx.tensor("text/input_ids_2").to_vec2().unwrap();
    let tokenizer_2 = sd.tokenizer_2.as_ref().unwrap();
    for (row, prompt) in prompts(&fx).iter().enumerate() {
        let own_1: Vec<i64> = sd
            .tokenizer
            .encode(prompt)
            .unwrap()
            .ids
            .iter()
            .map(|&i| i as i64)
            .collect();
        let own_2: Vec<i64> = tokenizer_2
            .encode(prompt)
            .unwrap()
            .ids
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(own_1, ids_1[row], "tokenizer, {prompt:?}");
        assert_eq!(own_2, ids_2[row], "tokenizer_2, {prompt:?}");
        let (embeds, _) = sd.encode_prompt(prompt).unwrap();
        let expected = fx
            .tensor("text/prompt_embeds")
            .get(row)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let context_error = max_abs_diff(&embeds.context, &expected);
        assert!(
            context_error < 1e-4,
            "{prompt:?}: prompt_embeds off by {context_error}"
        );
        let pooled = embeds.pooled.expect("SDXL has a pooled embedding");
        let expected = fx
            .tensor("text/pooled_prompt_embeds")
            .get(row)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pooled_error = max_abs_diff(&pooled, &expected);
        assert!(
            pooled_error < 1e-4,
            "{prompt:?}: pooled off by {pooled_error}"
        );
    }
}

/// Both text encoders with bf16 weights: the prompt and pooled embeddings stay within bf16's
/// rounding of diffusers' f32 ones (where the CPU has AVX512_BF16 the activations stay f32 around
/// bf16 products, the second encoder's projection included).
#[test]
fn bf16_text_encoders_stay_near_diffusers() {
    let fx = fixture();
    let options = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sdxl"), options).unwrap();
    for (row, prompt) in prompts(&fx).iter().enumerate() {
        let (embeds, _) = sd.encode_prompt(prompt).unwrap();
        let pooled = embeds.pooled.expect("SDXL has a pooled embedding");
        for (name, got) in [
            ("prompt_embeds", embeds.context),
            ("pooled_prompt_embeds", pooled),
        ] {
            let expected = fx.tensor(&format!("text/{name}")).get(row).unwrap();
            let expected = expected.unsqueeze(0).unwrap();
            let got = got.to_dtype(DType::F32).unwrap();
            let scale = f64::from(
                expected
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            let error = max_abs_diff(&got, &expected);
            assert!(
                error < 0.05 * scale,
                "{prompt:?}: bf16 {name} off by {error} (largest value {scale})"
            );
        }
    }
}

#[test]
fn unet_with_added_conditions_matches_diffusers() {
    let fx = fixture();
    let sd = pipeline();
    let conditioning = UNetConditioning {
        context: Some(fx.tensor("unet/encoder_hidden_states").clone()),
        text_time: Some(TextTimeConditioning {
            text_embeds: fx.tensor("unet/text_embeds").clone(),
            time_ids: fx.tensor("unet/time_ids").clone(),
        }),
        class_labels: None,
    };
    let sample = fx.tensor("unet/sample");
    for (name, t) in [
        ("out_t999", [999f32, 999.]),
        ("out_t1", [1., 1.]),
        ("out_tmixed", [999., 1.]),
    ] {
        let timesteps = Tensor::new(&t, &Device::Cpu).unwrap();
        let out = sd.unet.forward(sample, &timesteps, &conditioning).unwrap();
        let error = max_abs_diff(&out, fx.tensor(&format!("unet/{name}")));
        assert!(error < 1e-4, "{name}: off by {error}");
    }
    // Without its added conditions an SDXL U-Net refuses to run.
    let text_only = UNetConditioning::text(fx.tensor("unet/encoder_hidden_states").clone());
    let timesteps = Tensor::new(&[1f32, 1.], &Device::Cpu).unwrap();
    let err = sd
        .unet
        .forward(sample, &timesteps, &text_only)
        .unwrap_err()
        .to_string();
    assert!(err.contains("time ids"), "{err}");
}

#[test]
fn txt2img_reproduces_every_diffusers_sdxl_run() {
    let fx = fixture();
    let dir = std::env::temp_dir().join(format!("diffuse-sdxl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in [
        "pipe_euler",
        "pipe_euler_zero_neg",
        "pipe_euler_microcond",
        "pipe_dpmpp_2m_karras",
    ] {
        let model = fixture_path("tiny-sdxl");
        let (png, _) = run_fixture_case(&fx, case, &dir, &["--model".as_ref(), model.as_ref()], 0);
        assert_png_matches(case, &png, fx.tensor(&format!("{case}/image")));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// SDXL pipelines decode in f32 when asked for an f16 VAE whose config says `force_upcast`
/// (SDXL's VAE overflows in f16), as diffusers does; SD 1.x pipelines keep what was asked.
#[test]
fn sdxl_vaes_are_upcast_from_f16() {
    let f16 = || LoadOptions {
        vae_dtype: DType::F16,
        ..Default::default()
    };
    let xl = StableDiffusion::load_dir(&fixture_path("tiny-sdxl"), f16()).unwrap();
    assert_eq!(xl.options.vae_dtype, DType::F32);
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sd"), f16()).unwrap();
    assert_eq!(sd.options.vae_dtype, DType::F16);
}
