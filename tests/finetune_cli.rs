//! `diffuse finetune` on the tiny SD pipeline and a small folder: the denoising loss on the
//! training images falls, the LoRA file loads in `txt2img --lora`, the full fine-tune loads as
//! `txt2img --model`, skipped files are reported, and a bad folder stops before any work.

mod common;

use common::{fixture_path, last_json_line};
use image::{DynamicImage, ImageBuffer, Rgb};
use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-ft-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Four 48x40 pictures (stripes and a disc in different colours) with captions, and one file
/// that only claims to be a PNG.
fn small_folder(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let pictures: [(&str, [u8; 3], &str); 4] = [
        ("red", [220, 30, 30], "red stripes"),
        ("green", [30, 200, 40], "a green disc"),
        ("blue", [20, 40, 230], "blue stripes"),
        ("yellow", [240, 220, 20], "a yellow disc"),
    ];
    for (index, (name, colour, caption)) in pictures.into_iter().enumerate() {
        let disc = index % 2 == 1;
        let image = ImageBuffer::from_fn(48, 40, |x, y| {
            let on = if disc {
                (x as i32 - 24).pow(2) + (y as i32 - 20).pow(2) < 150
            } else {
                (x / 6) % 2 == 0
            };
            if on {
                Rgb(colour)
            } else {
                Rgb([250, 250, 250])
            }
        });
        DynamicImage::ImageRgb8(image)
            .save(dir.join(format!("{name}.png")))
            .unwrap();
        std::fs::write(dir.join(format!("{name}.txt")), caption).unwrap();
    }
    std::fs::write(dir.join("fake.png"), "not a png").unwrap();
    std::fs::write(dir.join("fake.txt"), "a fake").unwrap();
    dir
}

fn finetune(data: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let result = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("finetune")
        .arg("--model")
        .arg(fixture_path("tiny-sd"))
        .arg("--data")
        .arg(data)
        .arg("--out-dir")
        .arg(out)
        .args(["--resolution", "32", "--seed", "1", "--json"])
        .args(extra)
        .output()
        .unwrap();
    common::assert_success(&result);
    last_json_line(&result.stdout)
}

fn txt2img(extra: &[&str], model: &Path, output: &Path) {
    let result = Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .arg("--model")
        .arg(model)
        .args([
            "--steps", "2", "--seed", "1", "--width", "32", "--height", "32",
        ])
        .args(extra)
        .arg("--output")
        .arg(output)
        .arg("red stripes")
        .output()
        .unwrap();
    common::assert_success(&result);
    assert!(output.exists());
}

#[test]
fn lora_and_full_finetunes_lower_the_loss_and_load_in_txt2img() {
    let data = small_folder("data");
    let out = temp_dir("out");

    let lora = finetune(
        &data,
        &out.join("lora"),
        &[
            "--lora-rank",
            "4",
            "--steps",
            "60",
            "--learning-rate",
            "3e-3",
            "--checkpoint-every",
            "30",
            "--validation-prompt",
            "red stripes",
            "--validation-steps",
            "2",
        ],
    );
    let (before, after) = (
        lora["loss_before"].as_f64().unwrap(),
        lora["loss_after"].as_f64().unwrap(),
    );
    assert!(after < 0.9 * before, "LoRA: loss {before} -> {after}");
    assert_eq!(lora["mode"], "lora");
    let skipped = lora["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0]["file"].as_str().unwrap().ends_with("fake.png"));
    // Validation images before training, at the checkpoint and at the end; a CSV row every ten
    // steps (the default --log-every), each the mean of its ten.
    for step in [0, 30, 60] {
        let path = out.join(format!("lora/validation/step-{step:06}-0.png"));
        let image = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!((image.width(), image.height()), (32, 32));
    }
    let csv = std::fs::read_to_string(out.join("lora/loss.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{csv}");
    assert!(rows[5].starts_with("60,"), "{}", rows[5]);
    assert!(out.join("lora/loss.png").exists());
    let lora_file = PathBuf::from(lora["output"].as_str().unwrap());
    txt2img(
        &["--lora", lora_file.to_str().unwrap()],
        &fixture_path("tiny-sd"),
        &out.join("lora.png"),
    );

    let full = finetune(
        &data,
        &out.join("full"),
        &["--steps", "60", "--learning-rate", "5e-4"],
    );
    let (before, after) = (
        full["loss_before"].as_f64().unwrap(),
        full["loss_after"].as_f64().unwrap(),
    );
    assert!(after < 0.7 * before, "full: loss {before} -> {after}");
    let model = PathBuf::from(full["output"].as_str().unwrap());
    txt2img(&[], &model, &out.join("full.png"));

    std::fs::remove_dir_all(&data).ok();
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_folder_without_usable_images_stops_before_any_work() {
    let data = temp_dir("bad");
    std::fs::write(data.join("broken.jpg"), "not a jpeg").unwrap();
    std::fs::write(data.join("broken.txt"), "caption").unwrap();
    let out = data.join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("finetune")
        .arg("--model")
        .arg(fixture_path("tiny-sd"))
        .arg("--data")
        .arg(&data)
        .arg("--out-dir")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("broken.jpg") && stderr.contains("no usable images"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written");
    std::fs::remove_dir_all(&data).ok();
}

/// Options come from a TOML file, whose relative paths start at its folder (not the working
/// directory), the command line wins, and an unknown key is named.
#[test]
fn a_config_file_gives_the_options_and_flags_override_it() {
    let data = small_folder("config-data");
    let out = temp_dir("config");
    let config = out.join("finetune.toml");
    let data_name = data.file_name().unwrap().to_str().unwrap();
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = \"../{data_name}\"\nout_dir = \"run\"\nlora_rank = 2\n\
             steps = 50\nresolution = 32\n",
            fixture_path("tiny-sd").display().to_string(),
        ),
    )
    .unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .current_dir("/")
        .args(["finetune", "--config"])
        .arg(&config)
        .args(["--steps", "2", "--json"])
        .output()
        .unwrap();
    common::assert_success(&result);
    let json = last_json_line(&result.stdout);
    assert_eq!(json["steps"], 2, "the flag wins over the file");
    assert_eq!(json["mode"], "lora", "the file's lora_rank is used");
    assert!(
        out.join("run/pytorch_lora_weights.safetensors").is_file(),
        "out_dir is taken from the config's folder"
    );

    std::fs::write(&config, "lora_rnk = 2\n").unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["finetune", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("lora_rnk") && stderr.contains("finetune.toml"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&data).ok();
    std::fs::remove_dir_all(&out).ok();
}

/// A single-file --model is fine-tuned through its diffusers folder (converted once into the
/// cache), and the LoRA it gives loads with the single file in txt2img.
#[test]
fn a_single_file_model_fine_tunes_and_its_lora_loads_with_it() {
    let data = small_folder("single-data");
    let out = temp_dir("single-out");
    let cache = temp_dir("single-cache");
    let file = fixture_path("single-file/tiny-sd.safetensors");
    let config = fixture_path("tiny-sd");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .env("DIFFUSE_CACHE", &cache)
            .arg("finetune")
            .arg("--model")
            .arg(&file)
            .arg("--model-config")
            .arg(&config)
            .arg("--data")
            .arg(&data)
            .arg("--out-dir")
            .arg(out.join("lora"))
            .args([
                "--resolution",
                "32",
                "--seed",
                "1",
                "--json",
                "--lora-rank",
                "4",
            ])
            .args(["--steps", "3", "--skip-uncaptioned"])
            .output()
            .unwrap()
    };
    let result = run();
    common::assert_success(&result);
    let converted: Vec<_> = std::fs::read_dir(cache.join("converted"))
        .unwrap()
        .collect();
    assert_eq!(converted.len(), 1, "one converted folder in the cache");
    let lora = out.join("lora/pytorch_lora_weights.safetensors");
    assert!(lora.exists());
    let result = Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .arg("--model")
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .arg("--lora")
        .arg(&lora)
        .args([
            "--steps", "2", "--seed", "1", "--width", "32", "--height", "32",
        ])
        .arg("--output")
        .arg(out.join("single.png"))
        .arg("red stripes")
        .output()
        .unwrap();
    common::assert_success(&result);
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&data).ok();
}
