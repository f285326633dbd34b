//! TAESD (`AutoencoderTiny`) against diffusers: `tests/fixtures/tiny-taesd/` is a random-weight
//! model saved by diffusers with what its `decode` and `encode` return (make_reference.py).

mod common;

use candle_core::{DType, Device};
use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::model::taesd::{folder_files, TinyAutoencoder};
use diffuse::pipeline::{LoadOptions, StableDiffusion};

fn reference() -> Fixture {
    Fixture::load("tiny-taesd/reference.safetensors")
}

fn tiny() -> TinyAutoencoder {
    let (config, weights) = folder_files(&fixture_path("tiny-taesd")).unwrap();
    diffuse::weights::load_checked(&weights, DType::F32, &Device::Cpu, |vb| {
        TinyAutoencoder::new(&config, vb)
    })
    .unwrap()
}

#[test]
fn decode_and_encode_match_diffusers() {
    let fixture = reference();
    let model = tiny();
    let decoded = model.decode(fixture.tensor("latents")).unwrap();
    let err = max_abs_diff(&decoded, fixture.tensor("decoded"));
    assert!(err <= 1e-4, "decode differs from diffusers by {err}");
    let encoded = model.encode(fixture.tensor("image")).unwrap();
    let encode_err = max_abs_diff(&encoded, fixture.tensor("encoded"));
    assert!(
        encode_err <= 1e-4,
        "encode differs from diffusers by {encode_err}"
    );
    eprintln!("largest difference from diffusers: decode {err:.2e}, encode {encode_err:.2e}");
}

#[test]
fn a_pipeline_with_a_tiny_decoder_decodes_as_diffusers_does() {
    let options = LoadOptions {
        vae_decoder: Some(fixture_path("tiny-taesd").display().to_string()),
        ..Default::default()
    };
    let sd = StableDiffusion::load_dir(&fixture_path("tiny-sd"), options).unwrap();
    let fixture = reference();
    // diffusers: decode(latents / scaling_factor), then (x + 1) / 2 clamped to [0, 1].
    let images = sd.decode(fixture.tensor("latents")).unwrap();
    let expected = fixture
        .tensor("decoded")
        .affine(0.5, 0.5)
        .unwrap()
        .clamp(0.0, 1.0)
        .unwrap();
    let err = max_abs_diff(&images, &expected);
    assert!(err <= 1e-4, "{err}");
    let plain =
        StableDiffusion::load_dir(&fixture_path("tiny-sd"), LoadOptions::default()).unwrap();
    let kl = plain.decode(fixture.tensor("latents")).unwrap();
    assert!(
        max_abs_diff(&kl, &images) > 0.01,
        "the tiny decoder was not used"
    );
    // As the preview decoder only: previews from TAESD, pictures from the VAE.
    let options = LoadOptions {
        preview_decoder: Some(fixture_path("tiny-taesd").display().to_string()),
        ..Default::default()
    };
    let previewing = StableDiffusion::load_dir(&fixture_path("tiny-sd"), options).unwrap();
    let latents = fixture.tensor("latents");
    assert_eq!(max_abs_diff(&previewing.decode(latents).unwrap(), &kl), 0.0);
    assert_eq!(
        max_abs_diff(&previewing.decode_preview(latents).unwrap(), &images),
        0.0
    );
}

#[test]
fn a_tiny_decoder_that_does_not_fit_is_refused_by_name() {
    // The embedded model's VAE works at 4x; the fixture decodes at 8x.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["txt2img", "a photo of a bag", "--steps", "1", "--output"])
        .arg(std::env::temp_dir().join(format!("taesd-refused-{}.png", std::process::id())))
        .arg("--vae-decoder")
        .arg(fixture_path("tiny-taesd"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tiny-taesd") && err.contains("at 8x") && err.contains("at 4x"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("taesd-bad-{}", std::process::id()));
    common::copy_dir(&fixture_path("tiny-taesd"), &dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"relu\"", "\"silu\""),
    )
    .unwrap();
    let err = folder_files(&dir).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("act_fn = silu"),
        "{err}"
    );
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = folder_files(&dir).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
