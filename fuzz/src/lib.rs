//! What each fuzz target feeds to `diffuse`: every loader that takes a file from a stranger.
//! A target writes the input where the loader expects a file and calls the loader as the
//! command line does; an `Err` is the right answer to bad input, and a panic, an abort, a hang
//! or a large allocation is a finding.
//!
//! The main crate's `tests/fuzz_corpora.rs` includes this file and replays the committed seed
//! corpora and every finding (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through
//! the same functions, so CI checks them without libFuzzer.

use candle_core::{DType, Device};
use diffuse::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use std::path::{Path, PathBuf};

/// One fuzz target's body: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// The targets, by the name `cargo fuzz run` takes.
pub const TARGETS: [(&str, Target); 8] = [
    ("weights", weights),
    ("lora", lora),
    ("model_config", model_config),
    ("tokenizer", tokenizer),
    ("image", image),
    ("captions", captions),
    ("train_config", train_config),
    ("checkpoint", checkpoint),
];

/// The repository root, from either this crate (`fuzz/`) or the main one.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("fuzz_targets").is_dir() {
        here.parent().expect("fuzz/ has a parent").to_path_buf()
    } else {
        here.to_path_buf()
    }
}

fn tiny_sd() -> PathBuf {
    repo_root().join("tests/fixtures/tiny-sd")
}

/// A folder of this process's own for the files a target writes (in memory where /dev/shm
/// exists: the fuzzer writes one per execution).
fn scratch(target: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("diffuse-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("scratch folder");
    }
    std::fs::write(path, bytes).expect("scratch file");
}

/// Splits an input into `n` parts at NUL bytes (the last part takes the rest), so one input
/// can stand for several files.
fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |&b| b == 0).collect();
    out.resize(n, &[]);
    out
}

/// The smallest VAE the loaders build: two levels of 4 channels (its weights are the `weights`
/// target's seed).
pub fn tiny_vae_config() -> VaeConfig {
    serde_json::from_str(
        r#"{"block_out_channels": [4, 4], "layers_per_block": 1, "latent_channels": 2,
            "norm_num_groups": 2,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .expect("tiny VAE config")
}

/// A pixel DDPM config small enough to build at every execution (the `checkpoint` target's).
pub const TINY_PIXEL_CONFIG: &str = r#"
[data]
name = "mnist"
path = "unused"

[model]
autoencoder = "none"
conditioning = "none"
image_size = 8
channels = 1
block_out_channels = [4, 4]
layers_per_block = 1
norm_num_groups = 2

[train]
steps = 10
batch_size = 2
learning_rate = 0.001
out_dir = "unused"
"#;

/// A safetensors weights file, checked and built into a model the way `load_dir` builds each
/// component (shape checks, unexpected tensors reported).
pub fn weights(data: &[u8]) {
    let path = scratch("weights").join("model.safetensors");
    write(&path, data);
    let _ = diffuse::weights::tensor_shapes(&path);
    let _ = diffuse::weights::load_checked(&path, DType::F32, &Device::Cpu, |vb| {
        diffuse::model::vae::AutoencoderKL::new(tiny_vae_config(), vb)
    });
}

fn shapes(path: &Path) -> std::collections::HashMap<String, Vec<usize>> {
    diffuse::weights::tensor_shapes(path).expect("fixture weights")
}

/// A LoRA file (PEFT or kohya layout) merged against the tiny SD pipeline's weight shapes.
pub fn lora(data: &[u8]) {
    use diffuse::model::lora::{Component, LoraFile};
    let path = scratch("lora").join("lora.safetensors");
    write(&path, data);
    let Ok(file) = LoraFile::load(&path) else {
        return;
    };
    let root = tiny_sd();
    let unet = shapes(&root.join("unet/diffusion_pytorch_model.safetensors"));
    let text = shapes(&root.join("text_encoder/model.safetensors"));
    let _ = file.deltas(Component::Unet, &unet, 0.7);
    let _ = file.deltas(Component::TextEncoder, &text, 1.0);
}

/// A `config.json` of a U-Net, VAE or text encoder (built against the tiny pipeline's weights,
/// as `load_dir` does), a scheduler config (turned into every sampler), or a
/// `model_index.json`; the first byte picks which.
pub fn model_config(data: &[u8]) {
    let Some((&kind, text)) = data.split_first() else {
        return;
    };
    let root = tiny_sd();
    let dir = scratch("model_config");
    let build = |path: PathBuf, load: &dyn Fn(&Path) -> diffuse::Result<()>| {
        write(&dir.join("config.json"), text);
        let _ = load(&path);
    };
    match kind % 5 {
        0 => build(
            root.join("unet/diffusion_pytorch_model.safetensors"),
            &|weights| {
                let config: UNetConfig =
                    diffuse::model::config::read_json(&dir.join("config.json"))?;
                config.validate()?;
                diffuse::weights::load_checked(weights, DType::F32, &Device::Cpu, |vb| {
                    diffuse::model::unet::UNet2DConditionModel::new(config, vb)
                })
                .map(drop)
            },
        ),
        1 => build(
            root.join("vae/diffusion_pytorch_model.safetensors"),
            &|weights| {
                let config: VaeConfig =
                    diffuse::model::config::read_json(&dir.join("config.json"))?;
                config.validate()?;
                diffuse::weights::load_checked(weights, DType::F32, &Device::Cpu, |vb| {
                    diffuse::model::vae::AutoencoderKL::new(config, vb)
                })
                .map(drop)
            },
        ),
        2 => build(root.join("text_encoder/model.safetensors"), &|weights| {
            let config: ClipTextConfig =
                diffuse::model::config::read_json(&dir.join("config.json"))?;
            config.validate()?;
            diffuse::weights::load_checked(weights, DType::F32, &Device::Cpu, |vb| {
                diffuse::model::text::ClipTextModel::new(config, vb)
            })
            .map(drop)
        }),
        3 => {
            let Ok(text) = std::str::from_utf8(text) else {
                return;
            };
            let Ok(config) = diffuse::sampler::SchedulerConfig::from_json_str(text) else {
                return;
            };
            let options = diffuse::sampler::SamplerOptions::default();
            for kind in diffuse::sampler::SamplerKind::ALL {
                for steps in [1, 4] {
                    if let Ok(sampler) =
                        diffuse::sampler::build_sampler(kind, &config, &options, steps)
                    {
                        let _ = sampler.timesteps();
                    }
                }
            }
        }
        _ => {
            let path = dir.join("model_index.json");
            write(&path, text);
            let _ = diffuse::pipeline::check_model_index(&path);
        }
    }
}

/// Tokenizer files: `tokenizer.json` (first byte even) or `vocab.json` + `merges.txt`, with
/// `tokenizer_config.json`, then two prompts encoded.
pub fn tokenizer(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch("tokenizer").join(format!("t{}", kind % 2));
    let _ = std::fs::remove_dir_all(&dir);
    if kind % 2 == 0 {
        let [json, config] = parts(rest, 2)[..] else {
            return;
        };
        write(&dir.join("tokenizer.json"), json);
        write(&dir.join("tokenizer_config.json"), config);
    } else {
        let [vocab, merges, config] = parts(rest, 3)[..] else {
            return;
        };
        write(&dir.join("vocab.json"), vocab);
        write(&dir.join("merges.txt"), merges);
        write(&dir.join("tokenizer_config.json"), config);
    }
    if let Ok(tokenizer) = diffuse::tokenizer::ClipTokenizer::from_dir(&dir) {
        let _ = tokenizer.encode("a photo of a cat");
        let _ = tokenizer.encode("un café à 東京 🌸 !!");
    }
}

/// An image file decoded and resized as `--init-image` and the fine-tuning folder read it
/// (the last two bytes pick the target size, 1 to 64 a side).
pub fn image(data: &[u8]) {
    let path = scratch("image").join("input.img");
    write(&path, data);
    let n = data.len();
    let side = |i: usize| u32::from(data.get(i).copied().unwrap_or(7) % 64) + 1;
    let (w, h) = (side(n.wrapping_sub(2)), side(n.wrapping_sub(1)));
    let _ = diffuse::image_io::load_image(&path, Some((w, h)));
    let _ = diffuse::data::folder::load_square(&path, w, &Device::Cpu);
}

/// A fine-tuning folder: `metadata.jsonl` and a sidecar caption beside two real images and a
/// third file whose name comes from the input; scanned with each caption rule.
pub fn captions(data: &[u8]) {
    use diffuse::data::folder::{FolderOptions, ImageFolder, MissingCaption};
    let root = scratch("captions").join("folder");
    let _ = std::fs::remove_dir_all(&root);
    let [jsonl, sidecar, name] = parts(data, 3)[..] else {
        return;
    };
    let png = tiny_png();
    write(&root.join("a.png"), &png);
    write(&root.join("sub/b.png"), &png);
    if !jsonl.is_empty() {
        write(&root.join("metadata.jsonl"), jsonl);
    }
    write(&root.join("sub/b.txt"), sidecar);
    if let Ok(name) = std::str::from_utf8(name) {
        let safe = !name.is_empty()
            && !name.contains(['/', '\\', '\0'])
            && name != "."
            && name != ".."
            && name.len() < 200;
        // A name the folder already holds (`sub`, `a.png`) would overwrite the harness's own
        // files rather than add one.
        if safe && !root.join(name).exists() {
            write(&root.join(name), &png);
        }
    }
    for options in [
        FolderOptions::default(),
        FolderOptions {
            missing_caption: MissingCaption::Skip,
            ..Default::default()
        },
        FolderOptions {
            caption: Some("a photo of sks".into()),
            ..Default::default()
        },
    ] {
        let _ = ImageFolder::scan(&root, &options);
    }
}

/// An 8x8 RGB PNG.
fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, 8, 8);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("png header");
    writer
        .write_image_data(&[90u8; 8 * 8 * 3])
        .expect("png data");
    writer.finish().expect("png end");
    bytes
}

/// A TOML config of each trainer (pixel DDPM, latent, VAE) and of `finetune --config`.
pub fn train_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = diffuse::train::config::TrainingConfig::from_toml_str(text);
    if let Ok(config) = diffuse::train::config::TrainConfig::from_toml_str(text) {
        if config.validate().is_ok() {
            let described = config.description();
            let _ = described.unet_config();
            let _ = described.scheduler_config();
        }
    }
    if let Ok(config) = diffuse::train::config::LdmTrainConfig::from_toml_str(text) {
        if config.validate().is_ok() {
            let _ = config.text_config_json();
            let _ = config.unet_config_json(4, 8);
            let _ = config.scheduler_json();
        }
    }
    if let Ok(config) = diffuse::train::config::VaeTrainConfig::from_toml_str(text) {
        if config.validate().is_ok() {
            let _ = config.vae_config();
            let _ = config.diffusers_config(0.5);
        }
    }
    let path = scratch("train_config").join("finetune.toml");
    write(&path, data);
    let args = diffuse::cli::finetune::FinetuneArgs {
        config: Some(path),
        ..Default::default()
    };
    let _ = args.merged();
}

/// A training checkpoint given to `--resume` (pixel trainer, tiny config).
pub fn checkpoint(data: &[u8]) {
    let path = scratch("checkpoint").join("checkpoint.safetensors");
    write(&path, data);
    let config = diffuse::train::config::TrainConfig::from_toml_str(TINY_PIXEL_CONFIG)
        .expect("tiny pixel config");
    let _ = diffuse::train::pixel::PixelTrainer::resume(config, &path, &Device::Cpu);
}
