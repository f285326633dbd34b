//! `diffuse bench` as a smoke test only (never timed): one tiny run per component whose last
//! line is the JSON the benchmark scripts read.

mod common;

use common::{fixture_path, last_json_line};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's MNIST training config, run at batch 2 by the training benchmarks.
fn mnist_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/ddpm-mnist.toml")
}

/// Runs `diffuse bench <args> --config <config>`, asserts success, returns its stdout.
fn bench(args: &[&str], config: &Path) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("bench")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn bench_prints_its_json_summary() {
    for (component, config) in [
        ("unet", fixture_path("tiny-sd").join("unet/config.json")),
        (
            "vae-decode",
            fixture_path("tiny-sd").join("vae/config.json"),
        ),
        ("train-pixel", mnist_config()),
        (
            "finetune-lora",
            fixture_path("tiny-sd").join("unet/config.json"),
        ),
        ("txt2img", fixture_path("tiny-sd")),
    ] {
        let stdout = bench(
            &[
                component, "--size", "64", "--runs", "1", "--json", "--batch", "2",
            ],
            &config,
        );
        let json = last_json_line(&stdout);
        for key in ["median_s", "min_s", "max_s", "peak_rss_mb"] {
            assert!(
                json[key].as_f64().is_some_and(|v| v >= 0.0),
                "{component}: {key} in {json}"
            );
        }
    }
}

#[test]
fn train_ops_bench_names_each_op_with_a_time() {
    let stdout = bench(
        &["train-ops", "--runs", "1", "--batch", "2", "--json"],
        &mnist_config(),
    );
    let json = last_json_line(&stdout);
    let timings = json["median_ms"].as_object().unwrap();
    assert!(timings.len() >= 9, "{json}");
    assert!(
        timings
            .values()
            .all(|v| v.as_f64().is_some_and(|ms| ms > 0.0)),
        "{json}"
    );
    // The plain-text lines come before the JSON, one per op.
    let text = String::from_utf8_lossy(&stdout);
    assert!(
        text.contains("group norm + SiLU forward+backward: "),
        "{text}"
    );
}
