//! `diffuse train-vae`: the loss falls and the written `vae/` folder loads as the pipelines load
//! one; a resumed run ends with the weights of an uninterrupted one; bad configs are named.

mod common;

use candle_core::{Device, Tensor};
use diffuse::data::idx::Split;
use diffuse::data::image_set::{ImageSet, ImageSources};
use diffuse::model::config::{read_json, VaeConfig};
use diffuse::model::vae::AutoencoderKL;
use diffuse::train::config::VaeTrainConfig;
use diffuse::train::vae::VaeTrainer;
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-vae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two levels of 8 channels: 8x8 images to a 2x4x4 latent.
fn tiny_config(data: &Path, out: &Path, extra: &str) -> String {
    format!(
        r#"
[data]
paths = ["{}"]
image_size = 8
[model]
block_out_channels = [8, 8]
latent_channels = 2
norm_num_groups = 4
[train]
steps = 40
batch_size = 4
learning_rate = 0.003
seed = 3
out_dir = "{}"
checkpoint_every = 10
log_every = 5
{extra}
"#,
        data.display(),
        out.display()
    )
}

/// The tiny configs' images: one IDX folder at 8x8, grey.
fn images(dir: &Path, split: Split) -> ImageSet {
    let sources = ImageSources {
        idx: vec![dir.to_path_buf()],
        emoji: vec![],
        emoji_repeat: 1,
        per_class_limit: None,
    };
    ImageSet::load(&sources, split, 8, 1, [255; 3], false).unwrap()
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every weight of `a` equals the same weight of `b` bit for bit, as a resumed run's must
/// equal an uninterrupted one's.
fn assert_same_weights(a: &VaeTrainer, b: &VaeTrainer) {
    for ((name, x), (_, y)) in a.weights().unwrap().iter().zip(b.weights().unwrap()) {
        assert_eq!(values(x), values(&y), "{name} differs after resuming");
    }
}

#[test]
fn per_class_limit_keeps_the_first_images_of_each_class() {
    let dir = temp_dir("limit");
    // 12 images alternating between classes 0 and 1; image i's bright pixels are 200 + i.
    common::write_idx_dataset(&dir, 12, 8);
    let all = images(&dir, Split::Train);
    let limited = ImageSet::load(
        &ImageSources {
            idx: vec![dir.clone()],
            emoji: vec![],
            emoji_repeat: 1,
            per_class_limit: Some(2),
        },
        Split::Train,
        8,
        1,
        [255; 3],
        false,
    )
    .unwrap();
    assert_eq!(all.len(), 12);
    assert_eq!(limited.len(), 4);
    let classes: Vec<usize> = (0..4).map(|i| limited.class_of(i)).collect();
    assert_eq!(classes, [0, 1, 0, 1]);
    // The kept images are the dataset's first four, pixel for pixel.
    assert_eq!(limited.pixels, all.pixels[..4 * 64]);
}

#[test]
fn train_vae_lowers_the_loss_and_writes_a_loadable_vae() {
    let dir = temp_dir("cli");
    common::write_idx_dataset(&dir.join("data"), 12, 8);
    let out = dir.join("out");
    let config = dir.join("vae.toml");
    std::fs::write(&config, tiny_config(&dir.join("data"), &out, "")).unwrap();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["train-vae", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    common::assert_success(&result);
    let json = common::last_json_line(&result.stdout);
    let csv = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 8, "{csv}");
    assert!(
        losses[7] < 0.7 * losses[0],
        "the loss should fall: {losses:?}"
    );
    assert!(json["test_psnr_db"].as_f64().unwrap() > 10.0, "{json}");
    // The folder loads as a pipeline's vae/ does, with the measured scaling factor.
    let vae_dir = out.join("vae");
    let vae_config: VaeConfig = read_json(&vae_dir.join("config.json")).unwrap();
    let factor = json["scaling_factor"].as_f64().unwrap();
    assert!((vae_config.scaling_factor - factor).abs() < 1e-9);
    let vae = diffuse::weights::load_checked(
        &vae_dir.join("diffusion_pytorch_model.safetensors"),
        candle_core::DType::F32,
        &Device::Cpu,
        |vb| AutoencoderKL::new(vae_config, vb),
    )
    .unwrap();
    let data = images(&dir.join("data"), Split::Test);
    let x = data.batch(&[0, 1], &Device::Cpu).unwrap();
    let posterior = vae.encode(&x).unwrap();
    assert_eq!(posterior.mean.dims(), &[2, 2, 4, 4]);
    let decoded = vae.decode(&posterior.mean).unwrap();
    let l1 = (decoded - &x)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (l1 as f64 - json["test_l1"].as_f64().unwrap()).abs() < 0.2,
        "reloaded L1 {l1} vs {json}"
    );
    assert!(out.join("reconstructions.png").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resumed_vae_training_equals_uninterrupted_one() {
    let dir = temp_dir("resume");
    common::write_idx_dataset(&dir.join("data"), 12, 8);
    let config = VaeTrainConfig::from_toml_str(&tiny_config(&dir.join("data"), &dir, "")).unwrap();
    let data = images(&dir.join("data"), Split::Train);
    let mut straight = VaeTrainer::new(config.clone(), &Device::Cpu).unwrap();
    for _ in 0..4 {
        straight.train_step(&data).unwrap();
    }
    let mut first = VaeTrainer::new(config.clone(), &Device::Cpu).unwrap();
    for _ in 0..2 {
        first.train_step(&data).unwrap();
    }
    let checkpoint = dir.join("checkpoint.safetensors");
    first.save(&checkpoint).unwrap();
    let mut resumed = VaeTrainer::resume(config, &checkpoint, &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), 2);
    for _ in 0..2 {
        resumed.train_step(&data).unwrap();
    }
    assert_same_weights(&straight, &resumed);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_vae_configs_are_named() {
    let dir = temp_dir("bad");
    let data = dir.join("data");
    let text = tiny_config(&data, &dir, "").replace("image_size = 8", "image_size = 9");
    let err = VaeTrainConfig::from_toml_str(&text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.image_size = 9"), "{err}");
    let text = tiny_config(&data, &dir, "").replace("latent_channels", "latent_chanels");
    let err = VaeTrainConfig::from_toml_str(&text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("latent_chanels"), "{err}");
    let text = tiny_config(&data, &dir, "").replace("norm_num_groups = 4", "norm_num_groups = 3");
    let err = VaeTrainConfig::from_toml_str(&text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm_num_groups = 3"), "{err}");
    let err = VaeTrainConfig::from_toml_str(&tiny_config(&data, &dir, "train_encoder = false"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.init"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A decoder-only fine-tune starts from the given VAE, leaves its encoder (hence the latents a
/// diffusion model saw) bit-identical, and changes the decoder; it resumes like a full run.
#[test]
fn decoder_only_fine_tuning_keeps_the_encoder() {
    let dir = temp_dir("decoder");
    common::write_idx_dataset(&dir.join("data"), 12, 8);
    let data = images(&dir.join("data"), Split::Train);
    let config = VaeTrainConfig::from_toml_str(&tiny_config(&dir.join("data"), &dir, "")).unwrap();
    let mut base = VaeTrainer::new(config, &Device::Cpu).unwrap();
    for _ in 0..3 {
        base.train_step(&data).unwrap();
    }
    base.write_diffusers(&dir.join("vae"), 1.0).unwrap();
    let extra = format!(
        "init = \"{}\"\ntrain_encoder = false",
        dir.join("vae").display()
    );
    let config =
        VaeTrainConfig::from_toml_str(&tiny_config(&dir.join("data"), &dir, &extra)).unwrap();
    let mut tuned = VaeTrainer::new(config.clone(), &Device::Cpu).unwrap();
    assert!(tuned.parameter_count() < base.parameter_count());
    for _ in 0..2 {
        tuned.train_step(&data).unwrap();
    }
    let checkpoint = dir.join("checkpoint.safetensors");
    tuned.save(&checkpoint).unwrap();
    let mut resumed = VaeTrainer::resume(config, &checkpoint, &Device::Cpu).unwrap();
    for _ in 0..2 {
        tuned.train_step(&data).unwrap();
        resumed.train_step(&data).unwrap();
    }
    assert_same_weights(&tuned, &resumed);
    let mut decoder_changed = false;
    for ((name, before), (_, after)) in base.weights().unwrap().iter().zip(tuned.weights().unwrap())
    {
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            decoder_changed |= values(before) != values(&after);
        } else {
            assert_eq!(values(before), values(&after), "{name} changed");
        }
    }
    assert!(decoder_changed);
    std::fs::remove_dir_all(&dir).ok();
}

/// With a patch discriminator: its verdicts count from `adversarial_start`, both hinge losses are
/// logged, and a resumed run (discriminator and its optimiser included) ends with the weights of
/// an uninterrupted one.
#[test]
fn adversarial_vae_training_resumes_exactly() {
    let dir = temp_dir("adversarial");
    common::write_idx_dataset(&dir.join("data"), 12, 8);
    let data = images(&dir.join("data"), Split::Train);
    let extra = "adversarial_weight = 0.1\nadversarial_start = 1\ndiscriminator_channels = 4";
    let config =
        VaeTrainConfig::from_toml_str(&tiny_config(&dir.join("data"), &dir, extra)).unwrap();
    let mut straight = VaeTrainer::new(config.clone(), &Device::Cpu).unwrap();
    let stats: Vec<_> = (0..4)
        .map(|_| straight.train_step(&data).unwrap())
        .collect();
    assert_eq!(stats[0].adversarial, 0.0);
    assert!(stats[1..].iter().all(|s| s.adversarial != 0.0));
    assert!(stats.iter().all(|s| s.discriminator > 0.0));

    let mut first = VaeTrainer::new(config.clone(), &Device::Cpu).unwrap();
    for _ in 0..2 {
        first.train_step(&data).unwrap();
    }
    let checkpoint = dir.join("checkpoint.safetensors");
    first.save(&checkpoint).unwrap();
    let mut resumed = VaeTrainer::resume(config, &checkpoint, &Device::Cpu).unwrap();
    let resumed_stats: Vec<_> = (0..2).map(|_| resumed.train_step(&data).unwrap()).collect();
    assert_eq!(resumed_stats[1].discriminator, stats[3].discriminator);
    assert_same_weights(&straight, &resumed);

    let bad = tiny_config(
        &dir.join("data"),
        &dir,
        "adversarial_weight = 0.1\ndiscriminator_channels = 3",
    );
    let err = VaeTrainConfig::from_toml_str(&bad).unwrap_err().to_string();
    assert!(err.contains("train.discriminator_channels = 3"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `train-judge` on an IDX folder learns its two classes (left or right half bright) from the
/// training split and reads the test split, writing a judge folder that `Judge::load` reads back
/// with its shape.
#[test]
fn a_trained_judge_reads_its_classes_and_loads_back() {
    let dir = temp_dir("judge");
    common::write_idx_dataset(&dir.join("data"), 16, 8);
    let config = dir.join("judge.toml");
    std::fs::write(
        &config,
        "[data]\nkind = \"idx\"\npath = \"data\"\n[train]\nsteps = 60\nbatch_size = 8\n\
         learning_rate = 0.003\nout_dir = \"run\"\ncheckpoint_every = 30\nlog_every = 10\n\
         [model]\nwidths = [8, 16, 24]\n",
    )
    .unwrap();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["train-judge", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    common::assert_success(&result);
    let json = common::last_json_line(&result.stdout);
    assert_eq!(json["classes"], 2);
    assert_eq!(json["test_accuracy"], 1.0, "{json}");
    let judge = diffuse::judge::Judge::load(&dir.join("run/judge"), &Device::Cpu).unwrap();
    assert_eq!(
        judge.shape,
        diffuse::judge::JudgeShape {
            channels: 1,
            size: 8,
            classes: 2,
            widths: [8, 16, 24],
        }
    );
    let test = images(&dir.join("data"), Split::Test);
    let verdict = judge
        .score(&test.batch(&[0, 1], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(verdict.predicted().unwrap(), vec![0, 1]);
    std::fs::remove_dir_all(&dir).ok();
}
