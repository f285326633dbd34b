//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// The tensors of a safetensors fixture and the JSON object in its `fixtures_json` metadata.
pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = fixture_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        let meta_text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("fixtures_json").cloned())
            .expect("fixtures_json metadata");
        let meta = serde_json::from_str::<serde_json::Value>(&meta_text)
            .expect("json")
            .as_object()
            .expect("object")
            .clone();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
        Fixture { tensors, meta }
    }

    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn values_f64(&self, key: &str) -> Vec<f64> {
        self.tensor(key)
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn meta_str(&self, key: &str) -> &str {
        self.meta
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("fixture metadata has no {key}"))
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
pub mod oracle;

/// Copies a folder tree (fixtures into a private temporary copy).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Writes the fixture's `pipe_ddim/latents_in` as a `--latents` file (tensor `latents`).
pub fn write_fixture_latents(path: &Path) {
    let fx = Fixture::load("model_reference.safetensors");
    let latents = fx.tensor("pipe_ddim/latents_in").clone();
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), latents)]), path)
        .unwrap();
}

/// Asserts that the PNG at `png` is diffusers' `output_type='np'` image `expected` ([1, H, W,
/// 3] in [0, 1]) to within one 8-bit level on at least 99.9% of its values.
pub fn assert_png_matches(label: &str, png: &Path, expected: &Tensor) {
    let image = image::open(png)
        .unwrap_or_else(|e| panic!("{label}: {}: {e}", png.display()))
        .to_rgb8();
    let expected: Vec<f32> = expected
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pixels = image.into_raw();
    assert_eq!(pixels.len(), expected.len(), "{label}: image size");
    let levels: Vec<f32> = pixels
        .iter()
        .zip(&expected)
        .map(|(p, e)| (*p as f32 - (e * 255.0).round()).abs())
        .collect();
    let off = levels.iter().filter(|d| **d > 1.0).count();
    let exact = levels.iter().filter(|d| **d == 0.0).count();
    eprintln!(
        "{label}: {exact} of {} values exact, {off} more than one level off, worst {}",
        pixels.len(),
        levels.iter().cloned().fold(0.0, f32::max)
    );
    assert!(
        (off as f64) <= 0.001 * pixels.len() as f64,
        "{label}: {off} of {} values more than one level off",
        pixels.len()
    );
}

/// The `txt2img` flags of a diffusers call recorded in a fixture's `<case>/call` (steps,
/// guidance, eta, negative prompt, strength, SDXL's size conditions in W,H and X,Y order), then
/// `--` and the prompt.
pub fn case_flags(call: &serde_json::Value) -> Vec<String> {
    let steps = call
        .get("steps")
        .or_else(|| call.get("num_inference_steps"));
    let mut flags = vec![
        "--steps".to_string(),
        steps.expect("a step count").to_string(),
        "--guidance".into(),
        call["guidance_scale"].to_string(),
    ];
    if let Some(strength) = call.get("strength") {
        flags.extend(["--strength".into(), strength.to_string()]);
    }
    let kwargs = &call["call_kwargs"];
    if let Some(eta) = kwargs["eta"].as_f64() {
        flags.extend(["--eta".into(), eta.to_string()]);
    }
    if let Some(negative) = call["negative_prompt"].as_str() {
        flags.extend(["--negative".into(), negative.into()]);
    }
    let pair = |key: &str| -> Option<(u64, u64)> {
        let v = kwargs.get(key)?.as_array()?;
        Some((v[0].as_u64()?, v[1].as_u64()?))
    };
    // diffusers takes (h, w) and (top, left); the flags take W,H and X,Y.
    for (key, flag) in [
        ("original_size", "--original-size"),
        ("crops_coords_top_left", "--crops-coords-top-left"),
        ("target_size", "--target-size"),
    ] {
        if let Some((first, second)) = pair(key) {
            flags.extend([flag.into(), format!("{second},{first}")]);
        }
    }
    flags.extend(["--".into(), call["prompt"].as_str().unwrap().into()]);
    flags
}

/// Runs `txt2img` on fixture case `case`, writing into `dir`: `args` (the model, images), the
/// case's recorded `latents_in` as `--latents` when the fixture has it, its scheduler config,
/// `--seed seed`, then the flags of its call. Asserts success; returns the PNG and stderr.
pub fn run_fixture_case(
    fx: &Fixture,
    case: &str,
    dir: &Path,
    args: &[&std::ffi::OsStr],
    seed: u64,
) -> (PathBuf, String) {
    let call: serde_json::Value =
        serde_json::from_str(fx.meta_str(&format!("{case}/call"))).unwrap();
    let stem = case.replace('/', "-");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_txt2img"));
    command.args(args);
    if fx.has(&format!("{case}/latents_in")) {
        let latents = dir.join(format!("{stem}-latents.safetensors"));
        let latents_in = fx.tensor(&format!("{case}/latents_in")).clone();
        candle_core::safetensors::save(
            &HashMap::from([("latents".to_string(), latents_in)]),
            &latents,
        )
        .unwrap();
        command.arg("--latents").arg(latents);
    }
    let scheduler = dir.join(format!("{stem}-scheduler.json"));
    std::fs::write(&scheduler, fx.meta_str(&format!("{case}/scheduler_config"))).unwrap();
    let png = dir.join(format!("{stem}.png"));
    let out = command
        .arg("--scheduler-config")
        .arg(&scheduler)
        .args(["--seed", &seed.to_string(), "--output"])
        .arg(&png)
        .args(case_flags(&call))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{case}: {stderr}");
    (png, stderr)
}

/// The JSON object a `--json` command prints as its last line.
pub fn last_json_line(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.trim().lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

/// Asserts that a finished command succeeded, showing its stderr otherwise.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An `n`-image, `size`x`size` IDX dataset (train and t10k alike, gzipped) with two classes:
/// a bright left or right half.
pub fn write_idx_dataset(dir: &Path, n: u32, size: u32) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let label = (i % 2) as u8;
        labels.push(label);
        for _y in 0..size {
            for x in 0..size {
                let bright = (x < size / 2) == (label == 0);
                pixels.push(if bright { 200 + i as u8 } else { 10 });
            }
        }
    }
    let write = |name: &str, magic: u32, dims: &[u32], body: &[u8]| {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(body);
        let file = std::fs::File::create(dir.join(name)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        gz.finish().unwrap();
    };
    for split in ["train", "t10k"] {
        write(
            &format!("{split}-images-idx3-ubyte.gz"),
            0x803,
            &[n, size, size],
            &pixels,
        );
        write(
            &format!("{split}-labels-idx1-ubyte.gz"),
            0x801,
            &[n],
            &labels,
        );
    }
}
