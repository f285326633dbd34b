//! The CLIP text encoder, U-Net and VAE against diffusers/transformers outputs on the tiny
//! SD-1.x-shaped fixture (tests/fixtures/tiny-sd, tests/fixtures/model_reference.safetensors).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, Fixture};
use diffuse::model::config::{read_json, ClipTextConfig, UNetConfig, VaeConfig};
use diffuse::model::text::ClipTextModel;
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::unet::UNetConditioning;
use diffuse::model::vae::AutoencoderKL;
use diffuse::weights::var_builder;

fn reference() -> Fixture {
    Fixture::load("model_reference.safetensors")
}

fn component(name: &str, file: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = fixture_path("tiny-sd").join(name);
    (dir.join("config.json"), dir.join(file))
}

/// About twice the worst difference seen (8.3e-6, the VAE decoder's output on a 2-core Xeon
/// with AVX-512); summation order differs between CPUs and BLAS builds.
const TOLERANCE: f64 = 2e-5;

fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor, tol: f64) {
    assert_eq!(ours.dims(), theirs.dims(), "{name}: shape");
    let err = max_abs_diff(ours, theirs);
    eprintln!("{name}: max abs diff {err:.2e}");
    assert!(err <= tol, "{name}: max abs diff {err:e} > {tol:e}");
}

#[test]
fn text_encoder_matches_transformers() {
    let fx = reference();
    let (config, weights) = component("text_encoder", "model.safetensors");
    let vb = var_builder(&[&weights], DType::F32, &Device::Cpu).unwrap();
    let model = ClipTextModel::new(read_json::<ClipTextConfig>(&config).unwrap(), vb).unwrap();
    let ids = fx.tensor("text/input_ids").to_dtype(DType::U32).unwrap();
    let states = model.forward(&ids).unwrap();
    assert_close(
        "last_hidden_state",
        &states,
        fx.tensor("text/last_hidden_state"),
        TOLERANCE,
    );
}

#[test]
fn unet_matches_diffusers() {
    let fx = reference();
    let (config, weights) = component("unet", "diffusion_pytorch_model.safetensors");
    let vb = var_builder(&[&weights], DType::F32, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(read_json::<UNetConfig>(&config).unwrap(), vb).unwrap();
    let sample = fx.tensor("unet/sample");
    let context = fx.tensor("unet/encoder_hidden_states");
    for (name, t) in [
        ("out_t981", [981f32, 981.]),
        ("out_t1", [1., 1.]),
        ("out_tmixed", [981., 1.]),
    ] {
        let timesteps = Tensor::new(&t, &Device::Cpu).unwrap();
        let out = unet
            .forward(sample, &timesteps, &UNetConditioning::text(context.clone()))
            .unwrap();
        assert_close(name, &out, fx.tensor(&format!("unet/{name}")), TOLERANCE);
    }
}

#[test]
fn vae_matches_diffusers() {
    let fx = reference();
    let (config, weights) = component("vae", "diffusion_pytorch_model.safetensors");
    let vb = var_builder(&[&weights], DType::F32, &Device::Cpu).unwrap();
    let vae = AutoencoderKL::new(read_json::<VaeConfig>(&config).unwrap(), vb).unwrap();
    let posterior = vae.encode(fx.tensor("vae/enc_image")).unwrap();
    assert_close(
        "enc_mean",
        &posterior.mean,
        fx.tensor("vae/enc_mean"),
        TOLERANCE,
    );
    assert_close(
        "enc_logvar",
        &posterior.logvar,
        fx.tensor("vae/enc_logvar"),
        TOLERANCE,
    );
    let decoded = vae.decode(fx.tensor("vae/dec_latent")).unwrap();
    assert_close("dec_out", &decoded, fx.tensor("vae/dec_out"), TOLERANCE);
}
