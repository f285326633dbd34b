//! Pixel-DDPM training: resume equality, checkpoint errors, NaN handling, and the CLI's files.

mod common;

use candle_core::Device;
use diffuse::data::idx::{LabelledImages, Split};
use diffuse::train::config::TrainConfig;
use diffuse::train::pixel::PixelTrainer;
use std::path::{Path, PathBuf};

/// Runs the `diffuse` binary with `args`.
fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The 12-image, 8x8 two-class IDX dataset of the tests.
fn write_dataset(dir: &Path) {
    common::write_idx_dataset(dir, 12, 8);
}

fn tiny_config(data: &Path, out: &Path, extra: &str) -> String {
    format!(
        r#"
[data]
path = "{}"
[model]
autoencoder = "none"
conditioning = "class"
num_classes = 2
image_size = 8
block_out_channels = [8, 16]
layers_per_block = 1
norm_num_groups = 4
[diffusion]
num_train_timesteps = 50
{extra}
[train]
steps = 6
batch_size = 4
learning_rate = 0.001
warmup_steps = 2
ema_decay = 0.9
seed = 3
out_dir = "{}"
checkpoint_every = 3
sample_every = 0
log_every = 1
"#,
        data.display(),
        out.display()
    )
}

fn max_weight_diff(a: &PixelTrainer, b: &PixelTrainer) -> f64 {
    a.weights()
        .unwrap()
        .iter()
        .zip(b.weights().unwrap())
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, &nb);
            common::max_abs_diff(ta, &tb)
        })
        .fold(0.0, f64::max)
}

#[test]
fn interrupted_and_resumed_run_ends_with_the_same_weights() {
    for extra in [
        "",
        "schedule = \"cosine\"\nvariance = \"learned_range\"\nloss = \"hybrid\"",
    ] {
        let dir = temp_dir("resume");
        write_dataset(&dir);
        let config = TrainConfig::from_toml_str(&tiny_config(&dir, &dir, extra)).unwrap();
        let data = LabelledImages::load(&dir, Split::Train).unwrap();

        let mut straight = PixelTrainer::new(config.clone(), &Device::Cpu).unwrap();
        for _ in 0..6 {
            straight.train_step(&data).unwrap();
        }

        let mut first = PixelTrainer::new(config.clone(), &Device::Cpu).unwrap();
        for _ in 0..3 {
            first.train_step(&data).unwrap();
        }
        let checkpoint = dir.join("checkpoint.safetensors");
        first.save(&checkpoint).unwrap();
        drop(first);
        let mut resumed = PixelTrainer::resume(config.clone(), &checkpoint, &Device::Cpu).unwrap();
        assert_eq!(resumed.step(), 3);
        for _ in 0..3 {
            resumed.train_step(&data).unwrap();
        }
        assert_eq!(
            max_weight_diff(&straight, &resumed),
            0.0,
            "weights differ after resume ({extra})"
        );
        // The averaged weights too: sampling from both gives identical images.
        let a = straight.ema_model().unwrap();
        let b = resumed.ema_model().unwrap();
        let sample = |m: &diffuse::pipeline::pixel::PixelDiffusion| {
            m.sample(
                diffuse::sampler::SamplerKind::Ddpm,
                &Default::default(),
                10,
                2,
                Some(&[0, 1]),
                5,
                &mut |_, _| {},
            )
            .unwrap()
        };
        assert_eq!(common::max_abs_diff(&sample(&a), &sample(&b)), 0.0);

        // The same checkpoint in the layout written before the one training layout (format
        // "diffuse-pixel-ddpm", the config under "diffuse.train_config") resumes the same way.
        let loaded = diffuse::checkpoint::load(&checkpoint, &Device::Cpu).unwrap();
        let mut tensors: Vec<(String, candle_core::Tensor)> = loaded.tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let earlier = dir.join("earlier.safetensors");
        diffuse::checkpoint::save(
            &earlier,
            &tensors,
            &std::collections::BTreeMap::from([
                ("format".to_string(), "diffuse-pixel-ddpm".to_string()),
                ("diffuse.step".to_string(), "3".to_string()),
                ("diffuse.train_config".to_string(), config.to_toml()),
            ]),
        )
        .unwrap();
        let mut from_earlier =
            PixelTrainer::resume(config.clone(), &earlier, &Device::Cpu).unwrap();
        for _ in 0..3 {
            from_earlier.train_step(&data).unwrap();
        }
        assert_eq!(max_weight_diff(&straight, &from_earlier), 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn checkpoint_of_another_shape_is_refused_by_tensor_name() {
    let dir = temp_dir("shape");
    write_dataset(&dir);
    let config = TrainConfig::from_toml_str(&tiny_config(&dir, &dir, "")).unwrap();
    let trainer = PixelTrainer::new(config.clone(), &Device::Cpu).unwrap();
    let checkpoint = dir.join("checkpoint.safetensors");
    trainer.save(&checkpoint).unwrap();
    let wider =
        TrainConfig::from_toml_str(&tiny_config(&dir, &dir, "").replace("[8, 16]", "[8, 24]"))
            .unwrap();
    // Resuming with another [model] section is refused before any tensor is read.
    let err = PixelTrainer::resume(wider.clone(), &checkpoint, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.block_out_channels (checkpoint: [8, 16], this run: [8, 24])"),
        "{err}"
    );
    // Loading the weights into another shape names the tensor.
    let mut weights: std::collections::HashMap<String, candle_core::Tensor> =
        trainer.weights().unwrap().into_iter().collect();
    let err = diffuse::pipeline::pixel::PixelDiffusion::from_tensors(
        wider.description(),
        weights.clone(),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("down_blocks.1"), "{err}");
    weights.remove("conv_in.weight");
    let err = diffuse::pipeline::pixel::PixelDiffusion::from_tensors(
        config.description(),
        weights,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("conv_in.weight"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_cli_writes_checkpoint_csv_curve_and_refuses_to_overwrite() {
    let dir = temp_dir("cli");
    write_dataset(&dir);
    let out = dir.join("run");
    let config_path = dir.join("tiny.toml");
    std::fs::write(
        &config_path,
        tiny_config(&dir, &out, "").replace("sample_every = 0", "sample_every = 6"),
    )
    .unwrap();
    let config = config_path.to_str().unwrap();
    let first = run(&["train", "--config", config, "--steps", "3", "--json"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let summary = common::last_json_line(&first.stdout);
    assert_eq!(summary["steps"], 3);
    for file in [
        "checkpoint.safetensors",
        "model.safetensors",
        "loss.csv",
        "loss.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // A second run without --resume refuses and leaves the checkpoint alone.
    let before = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let again = run(&["train", "--config", config, "--steps", "3"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    assert_eq!(
        before,
        std::fs::read(out.join("checkpoint.safetensors")).unwrap()
    );
    // --resume continues to the new total; the CSV has one row per step, no repeats.
    let resumed = run(&["train", "--config", config, "--resume", "--json"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(common::last_json_line(&resumed.stdout)["steps"], 6);
    let csv = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let steps: Vec<usize> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert!(out.join("samples-0000006.png").is_file());
    // Sampling writes a grid and one gray PNG per image; class 5 of a 2-class model is refused.
    let weights = out.join("model.safetensors");
    let weights = weights.to_str().unwrap();
    let grid = dir.join("grid.png");
    let images = dir.join("images");
    let sampled = run(&[
        "sample",
        "--checkpoint",
        weights,
        "--steps",
        "5",
        "-n",
        "3",
        "--grid",
        grid.to_str().unwrap(),
        "--out-dir",
        images.to_str().unwrap(),
        "--class",
        "1",
    ]);
    assert!(
        sampled.status.success(),
        "{}",
        String::from_utf8_lossy(&sampled.stderr)
    );
    let one = image::open(images.join("00002.png")).unwrap();
    assert_eq!(
        (one.width(), one.height(), one.color()),
        (8, 8, image::ColorType::L8)
    );
    assert!(grid.is_file());
    let refused = run(&[
        "sample",
        "--checkpoint",
        weights,
        "--grid",
        grid.to_str().unwrap(),
        "--class",
        "5",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("class"));
    // Eval reports both likelihood routes (8x8 images have no judge, so no sampling).
    let eval = run(&[
        "eval",
        "--checkpoint",
        weights,
        "--subset",
        "4",
        "--ode-subset",
        "2",
        "--ode-tolerance",
        "1e-3",
        "--samples",
        "0",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let report = common::last_json_line(&eval.stdout);
    for key in ["vlb_bits_per_dim", "ode_bits_per_dim"] {
        let bits = report[key].as_f64().unwrap();
        // An untrained model is poor, but its bound is finite and positive.
        assert!(bits.is_finite() && bits > 0.0, "{key} = {bits}");
    }
    let terms = &report["vlb_terms"];
    let parts = ["prior", "kl", "decoder"].map(|k| terms[k].as_f64().unwrap());
    assert!(
        (parts.iter().sum::<f64>() - report["vlb_bits_per_dim"].as_f64().unwrap()).abs() < 1e-9
    );
    // A truncated checkpoint is named on resume, and nothing is overwritten.
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    std::fs::write(
        out.join("checkpoint.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let broken = run(&["train", "--config", config, "--resume", "--steps", "8"]);
    assert!(!broken.status.success());
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A missing data folder stops before any work.
    let missing = run(&[
        "train",
        "--config",
        config,
        "--data",
        "/nonexistent",
        "--out-dir",
        dir.join("other").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C (SIGINT) mid-run saves the step reached, and --resume continues from it.
#[test]
fn interrupt_saves_a_checkpoint_that_resumes() {
    let dir = temp_dir("sigint");
    write_dataset(&dir);
    let out = dir.join("run");
    let config_path = dir.join("tiny.toml");
    std::fs::write(
        &config_path,
        tiny_config(&dir, &out, "")
            .replace("steps = 6", "steps = 100000")
            .replace("checkpoint_every = 3", "checkpoint_every = 100000"),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["train", "--config", config_path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then interrupt.
    let csv = out.join("loss.csv");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count()) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "training never logged a step"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sends SIGINT to the child process this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    let config =
        TrainConfig::from_toml_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let resumed =
        PixelTrainer::resume(config, &out.join("checkpoint.safetensors"), &Device::Cpu).unwrap();
    let saved = resumed.step();
    assert!(saved >= 3, "saved at step {saved}");
    // `--resume` goes on from the saved step to the new total, one CSV row per step.
    let total = saved + 2;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args([
            "train",
            "--config",
            config_path.to_str().unwrap(),
            "--resume",
        ])
        .args(["--steps", &total.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        common::last_json_line(&output.stdout)["steps"],
        total,
        "the resumed run ends at the new total"
    );
    let steps: Vec<usize> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(steps.last(), Some(&total));
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(unique, steps, "no step logged twice");
    let after = PixelTrainer::resume(
        TrainConfig::from_toml_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap(),
        &out.join("checkpoint.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(after.step(), total);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A diverging run (absurd learning rate) stops with the step at which the loss stopped being
/// finite, and leaves the last checkpoint written before it untouched.
#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = temp_dir("nan");
    write_dataset(&dir);
    let out = dir.join("run");
    let config_path = dir.join("tiny.toml");
    std::fs::write(
        &config_path,
        tiny_config(&dir, &out, "")
            .replace("learning_rate = 0.001", "learning_rate = 1e30")
            .replace("warmup_steps = 2", "warmup_steps = 0")
            .replace("checkpoint_every = 3", "checkpoint_every = 1")
            .replace("steps = 6", "steps = 50"),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["train", "--config", config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("at step"), "{stderr}");
    let failed_at: usize = stderr
        .split("at step ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    // The checkpoint on disk is the last one before the failing step, and it loads.
    let config =
        TrainConfig::from_toml_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let resumed =
        PixelTrainer::resume(config, &out.join("checkpoint.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), failed_at - 1, "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn time_limit_stops_after_the_step_it_runs_out_in_and_saves() {
    let dir = temp_dir("time-limit");
    write_dataset(&dir);
    let out = dir.join("run");
    let config_path = dir.join("tiny.toml");
    std::fs::write(&config_path, tiny_config(&dir, &out, "")).unwrap();
    let config = config_path.to_str().unwrap();
    let refused = run(&["train", "--config", config, "--time-limit", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--time-limit = 0 is not allowed"));
    assert!(
        !out.exists(),
        "a refused run must not create its output folder"
    );
    // A limit far shorter than one step: exactly one step runs, is saved, and the run succeeds.
    let limited = run(&[
        "train",
        "--config",
        config,
        "--steps",
        "50",
        "--time-limit",
        "0.000001",
        "--json",
    ]);
    assert!(
        limited.status.success(),
        "{}",
        String::from_utf8_lossy(&limited.stderr)
    );
    assert_eq!(common::last_json_line(&limited.stdout)["steps"], 1);
    let resumed = PixelTrainer::resume(
        TrainConfig::from_file(&config_path).unwrap(),
        &out.join("checkpoint.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(resumed.step(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
