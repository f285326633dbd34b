//! `diffuse train` with a text-to-image latent config: the loss falls, the written pipeline
//! folder loads and draws through `txt2img`, a resumed run ends with the weights of an
//! uninterrupted one, cached latents are reused only when they match, and bad configs are named.

mod common;

use candle_core::Device;
use diffuse::data::idx::Split;
use diffuse::train::config::{LdmTrainConfig, VaeTrainConfig};
use diffuse::train::latent_data::LatentData;
use diffuse::train::ldm::LdmTrainer;
use diffuse::train::vae::VaeTrainer;
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-ldm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two-class 8x8 data with a classes.json, and an untrained 1-channel VAE (8x8 to 2x4x4).
fn setup(dir: &Path) {
    let data = dir.join("data");
    common::write_idx_dataset(&data, 16, 8);
    std::fs::write(
        data.join("classes.json"),
        r#"{"classes": ["L", "R"], "words": ["left", "right"],
            "caption_template": "a bright {word} half", "alternative_templates": ["{word}"]}"#,
    )
    .unwrap();
    let vae_config = VaeTrainConfig::from_toml_str(&format!(
        r#"
[data]
paths = ["{}"]
image_size = 8
[model]
block_out_channels = [8, 8]
latent_channels = 2
norm_num_groups = 4
[train]
steps = 1
batch_size = 2
learning_rate = 0.001
out_dir = "{}"
"#,
        data.display(),
        dir.join("vae-run").display()
    ))
    .unwrap();
    VaeTrainer::new(vae_config, &Device::Cpu)
        .unwrap()
        .write_diffusers(&dir.join("vae"), 1.0)
        .unwrap();
}

fn config_text(dir: &Path, extra_model: &str) -> String {
    format!(
        r#"
[data]
paths = ["{data}"]
image_size = 8
caption_dropout = 0.2
[model]
autoencoder = "vae"
conditioning = "text"
vae = "{vae}"
tokenizer = "{tokenizer}"
text_hidden_size = 16
text_layers = 1
text_heads = 2
block_out_channels = [16, 16]
layers_per_block = 1
attention_heads = 2
norm_num_groups = 8
{extra_model}
[diffusion]
schedule = "scaled_linear"
beta_start = 0.00085
beta_end = 0.012
[train]
steps = 30
batch_size = 8
learning_rate = 0.003
warmup_steps = 2
seed = 5
out_dir = "{out}"
checkpoint_every = 10
sample_every = 0
log_every = 5
"#,
        data = dir.join("data").display(),
        vae = dir.join("vae").display(),
        tokenizer = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sd/tokenizer")
            .display(),
        out = dir.join("out").display(),
    )
}

#[test]
fn training_lowers_the_loss_and_writes_a_pipeline_txt2img_loads() {
    let dir = temp_dir("cli");
    setup(&dir);
    let config = dir.join("ldm.toml");
    std::fs::write(&config, config_text(&dir, "")).unwrap();
    let bin = env!("CARGO_BIN_EXE_diffuse");
    let result = std::process::Command::new(bin)
        .args(["train", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    common::assert_success(&result);
    let json = common::last_json_line(&result.stdout);
    assert_eq!(json["steps"], 30);
    let csv = std::fs::read_to_string(dir.join("out/loss.csv")).unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 6, "{csv}");
    assert!(
        losses[5] < 0.8 * losses[0],
        "the loss should fall: {losses:?}"
    );
    assert!(dir.join("out/latents.safetensors").is_file());
    // The pipeline folder is what txt2img loads; its native size is the VAE's 8x8.
    let image = dir.join("left.png");
    let result = std::process::Command::new(bin)
        .args([
            "txt2img",
            "a bright left half",
            "--steps",
            "4",
            "--seed",
            "1",
        ])
        .arg("--model")
        .arg(dir.join("out/pipeline"))
        .arg("--output")
        .arg(&image)
        .output()
        .unwrap();
    common::assert_success(&result);
    assert!(
        !String::from_utf8_lossy(&result.stderr).contains("warning"),
        "a trained caption is known"
    );
    let png = image::open(&image).unwrap();
    assert_eq!((png.width(), png.height()), (8, 8));
    // The pipeline lists the caption sets it was trained on, which txt2img searches.
    let concepts = diffuse::pipeline::concepts::Concepts::read(&dir.join("out/pipeline"))
        .unwrap()
        .expect("pipeline/concepts.json");
    assert_eq!(concepts.concepts.len(), 2);
    assert_eq!(concepts.concepts[0][0], "a bright left half");
    // Starting over an existing run is refused, nothing touched.
    let again = std::process::Command::new(bin)
        .args(["train", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}

#[test]
fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let dir = temp_dir("resume");
    setup(&dir);
    let config = LdmTrainConfig::from_toml_str(&config_text(&dir, "")).unwrap();
    let data = LatentData::load(&config, Split::Train, None, |_, _| {}).unwrap();
    let dims = data.latent_dims().unwrap();
    assert_eq!(dims, (2, 4, 4));
    assert_eq!(data.num_classes(), 2);
    let mut straight = LdmTrainer::new(config.clone(), dims, &Device::Cpu).unwrap();
    for _ in 0..6 {
        straight.train_step(&data).unwrap();
    }
    let mut first = LdmTrainer::new(config.clone(), dims, &Device::Cpu).unwrap();
    for _ in 0..3 {
        first.train_step(&data).unwrap();
    }
    let checkpoint = dir.join("checkpoint.safetensors");
    first.save(&checkpoint).unwrap();
    drop(first);
    let mut resumed = LdmTrainer::resume(config.clone(), dims, &checkpoint, &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), 3);
    for _ in 0..3 {
        resumed.train_step(&data).unwrap();
    }
    let (a, b) = (straight.weights().unwrap(), resumed.weights().unwrap());
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        let diff = common::max_abs_diff(tensor, &b[name]);
        assert_eq!(diff, 0.0, "{name} differs by {diff}");
    }
    // A checkpoint of another model is refused by name.
    let other = LdmTrainConfig::from_toml_str(
        &config_text(&dir, "").replace("text_hidden_size = 16", "text_hidden_size = 32"),
    )
    .unwrap();
    let err = LdmTrainer::resume(other, dims, &checkpoint, &Device::Cpu)
        .err()
        .expect("another model's checkpoint must be refused")
        .to_string();
    assert!(
        err.contains("model.text_hidden_size (checkpoint: 16, this run: 32)"),
        "{err}"
    );
}

#[test]
fn cached_latents_are_reused_only_for_the_same_autoencoder() {
    let dir = temp_dir("cache");
    setup(&dir);
    let config = LdmTrainConfig::from_toml_str(&config_text(&dir, "")).unwrap();
    let cache = dir.join("latents.safetensors");
    let fresh = LatentData::load(&config, Split::Train, Some(&cache), |_, _| {}).unwrap();
    assert!(cache.is_file());
    let mut encoded = 0;
    let cached =
        LatentData::load(&config, Split::Train, Some(&cache), |_, _| encoded += 1).unwrap();
    assert_eq!(encoded, 0, "the cache should have been used");
    assert_eq!(common::max_abs_diff(&fresh.latents, &cached.latents), 0.0);
    // Another autoencoder (here: other weights) invalidates it.
    let weights = dir.join("vae/diffusion_pytorch_model.safetensors");
    let loaded = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let doubled: std::collections::HashMap<String, candle_core::Tensor> = loaded
        .into_iter()
        .map(|(k, v)| (k, (v * 2.0).unwrap()))
        .collect();
    candle_core::safetensors::save(&doubled, &weights).unwrap();
    let mut encoded = 0;
    LatentData::load(&config, Split::Train, Some(&cache), |_, _| encoded += 1).unwrap();
    assert!(encoded > 0, "a stale cache must be recomputed");
}

#[test]
fn bad_configs_are_named() {
    let dir = temp_dir("bad");
    setup(&dir);
    let good = config_text(&dir, "");
    let err = |text: String| {
        LdmTrainConfig::from_toml_str(&text)
            .unwrap_err()
            .to_string()
    };
    let e = err(good.replace("text_layers = 1", "text_layers = 1\ntext_layerz = 2"));
    assert!(e.contains("text_layerz"), "{e}");
    let e = err(good.replace("text_heads = 2", "text_heads = 3"));
    assert!(e.contains("text_heads"), "{e}");
    let e = err(good.replace("caption_dropout = 0.2", "caption_dropout = 1.5"));
    assert!(e.contains("caption_dropout"), "{e}");
    let e = err(good.replace("conditioning = \"text\"", "conditioning = \"class\""));
    assert!(e.contains("conditioning") || e.contains("class"), "{e}");
    // A dataset folder without classes.json stops before any work, naming the file.
    std::fs::remove_file(dir.join("data/classes.json")).unwrap();
    let config = LdmTrainConfig::from_toml_str(&good).unwrap();
    let e = LatentData::load(&config, Split::Train, None, |_, _| {})
        .err()
        .expect("a missing classes.json must be an error")
        .to_string();
    assert!(e.contains("classes.json"), "{e}");
}

#[test]
fn a_run_can_start_from_an_earlier_pipeline() {
    let dir = temp_dir("init");
    setup(&dir);
    let config = LdmTrainConfig::from_toml_str(&config_text(&dir, "")).unwrap();
    let data = LatentData::load(&config, Split::Train, None, |_, _| {}).unwrap();
    let dims = data.latent_dims().unwrap();
    let mut earlier = LdmTrainer::new(config.clone(), dims, &Device::Cpu).unwrap();
    for _ in 0..3 {
        earlier.train_step(&data).unwrap();
    }
    let pipeline = dir.join("earlier");
    earlier
        .write_pipeline(&pipeline, candle_core::DType::F16)
        .unwrap();
    // The autoencoder is written in the export's dtype too, its weights rounded from the config's.
    let vae_file = "vae/diffusion_pytorch_model.safetensors";
    let source = candle_core::safetensors::load(dir.join(vae_file), &Device::Cpu).unwrap();
    let exported = candle_core::safetensors::load(pipeline.join(vae_file), &Device::Cpu).unwrap();
    assert_eq!(source.len(), exported.len());
    for (key, tensor) in &source {
        let half = &exported[key];
        assert_eq!(half.dtype(), candle_core::DType::F16, "{key}");
        let rounded = tensor.to_dtype(candle_core::DType::F16).unwrap();
        assert_eq!(common::max_abs_diff(half, &rounded), 0.0, "{key}");
    }
    let init = format!("init = \"{}\"", pipeline.display());
    let later_config = LdmTrainConfig::from_toml_str(&config_text(&dir, &init)).unwrap();
    let later = LdmTrainer::new(later_config, dims, &Device::Cpu).unwrap();
    let fresh = LdmTrainer::new(config.clone(), dims, &Device::Cpu).unwrap();
    let (later_weights, fresh_weights) = (later.weights().unwrap(), fresh.weights().unwrap());
    let mut compared = 0;
    for (component, file) in [
        ("text_encoder.", "text_encoder/model.safetensors"),
        ("unet.", "unet/diffusion_pytorch_model.safetensors"),
    ] {
        let saved = candle_core::safetensors::load(pipeline.join(file), &Device::Cpu).unwrap();
        for (key, tensor) in saved {
            let name = format!("{component}{key}");
            let expected = tensor.to_dtype(candle_core::DType::F32).unwrap();
            assert_eq!(
                common::max_abs_diff(&later_weights[&name], &expected),
                0.0,
                "{name}"
            );
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        later_weights.len(),
        "every variable comes from the pipeline"
    );
    // The zero-initialised output conv of a fresh run has learnt something in the earlier one.
    assert!(
        common::max_abs_diff(
            &later_weights["unet.conv_out.weight"],
            &fresh_weights["unet.conv_out.weight"]
        ) > 0.0
    );
    // A pipeline of another shape is refused, naming the file and tensor.
    let wider = config_text(&dir, &init).replace("text_hidden_size = 16", "text_hidden_size = 32");
    let err = LdmTrainer::new(
        LdmTrainConfig::from_toml_str(&wider).unwrap(),
        dims,
        &Device::Cpu,
    )
    .err()
    .expect("a pipeline of another shape must be refused")
    .to_string();
    assert!(
        err.contains("text_encoder/model.safetensors") && err.contains("shape"),
        "{err}"
    );
}
