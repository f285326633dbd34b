//! Bad input gets a one-line error that names the value and what is allowed, never a panic.

use diffuse::sampler::{build_sampler, SamplerKind, SamplerOptions, SchedulerConfig};
use std::process::Command;

fn error_text<T>(r: diffuse::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_sampler_names_the_value_and_the_choices() {
    let msg = error_text(SamplerKind::parse("eulr"));
    assert!(
        msg.contains("eulr") && msg.contains("dpmpp-2m") && msg.contains("--sampler"),
        "{msg}"
    );
}

#[test]
fn step_counts_outside_the_training_range_are_refused() {
    let config = SchedulerConfig::default();
    for steps in [0, 1001] {
        let msg = error_text(build_sampler(
            SamplerKind::Ddim,
            &config,
            &SamplerOptions::default(),
            steps,
        ));
        assert!(
            msg.contains("steps") && msg.contains(&steps.to_string()) && msg.contains("1 to 1000"),
            "{msg}"
        );
    }
}

#[test]
fn negative_eta_is_refused() {
    let options = SamplerOptions {
        eta: -0.5,
        ..Default::default()
    };
    let msg = error_text(build_sampler(
        SamplerKind::Ddim,
        &SchedulerConfig::default(),
        &options,
        10,
    ));
    assert!(
        msg.contains("eta") && msg.contains("-0.5") && msg.contains(">= 0"),
        "{msg}"
    );
}

#[test]
fn karras_with_a_timestep_sampler_is_a_contradiction() {
    let options = SamplerOptions {
        karras: true,
        ..Default::default()
    };
    let msg = error_text(build_sampler(
        SamplerKind::Ddpm,
        &SchedulerConfig::default(),
        &options,
        10,
    ));
    assert!(msg.contains("--karras") && msg.contains("ddpm"), "{msg}");
}

#[test]
fn bad_config_values_name_their_key() {
    let cases = [
        (r#"{"beta_schedule": "quadratic"}"#, "beta_schedule"),
        (r#"{"prediction_type": "noise"}"#, "prediction_type"),
        (r#"{"timestep_spacing": "even"}"#, "timestep_spacing"),
        (r#"{"num_train_timesteps": "many"}"#, "num_train_timesteps"),
        (r#"{"beta_start": [1]}"#, "beta_start"),
        (
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler"}"#,
            "_class_name",
        ),
        (r#"{"solver_order": 7}"#, "solver_order"),
        (
            r#"{"use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
    ];
    for (json, key) in cases {
        let msg = error_text(SchedulerConfig::from_json_str(json));
        assert!(msg.contains(key), "{json}: {msg}");
    }
}

#[test]
fn contradictory_configs_are_refused() {
    let msg = error_text(
        SchedulerConfig::from_json_str(
            r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000}"#,
        )
        .and_then(|c| c.noise_schedule()),
    );
    assert!(
        msg.contains("trained_betas") && msg.contains("1000"),
        "{msg}"
    );
    let msg = error_text(SchedulerConfig::from_json_str(
        r#"{"use_karras_sigmas": true, "use_beta_sigmas": true}"#,
    ));
    assert!(
        msg.contains("use_karras_sigmas") && msg.contains("use_beta_sigmas"),
        "{msg}"
    );
    let msg = error_text(
        SchedulerConfig::from_json_str(r#"{"beta_start": 0.5, "beta_end": 2.0}"#)
            .and_then(|c| c.noise_schedule()),
    );
    assert!(msg.contains("beta"), "{msg}");
}

#[test]
fn malformed_json_and_missing_files_are_reported() {
    let msg = error_text(SchedulerConfig::from_json_str("{\"beta_start\": "));
    assert!(msg.contains("JSON"), "{msg}");
    let path = std::path::Path::new("/nonexistent/scheduler_config.json");
    let msg = error_text(SchedulerConfig::from_file(path));
    assert!(msg.contains("/nonexistent/scheduler_config.json"), "{msg}");
}

#[test]
fn python_non_finite_tokens_are_read() {
    let config = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "note": "a string with -Infinity inside stays a string"}"#,
    )
    .unwrap();
    assert_eq!(config.lambda_min_clipped, f64::NEG_INFINITY);
}

fn run_diffuse(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_rejects_bad_sampler_settings_before_any_work() {
    for (args, needle) in [
        (vec!["toy", "swiss-roll", "--sampler", "fast"], "--sampler"),
        (vec!["toy", "swiss-roll", "--steps", "0"], "steps"),
        (vec!["toy", "swiss-roll", "--steps", "5000"], "steps"),
        (
            vec!["toy", "swiss-roll", "--sampler", "ddim", "--eta", "-1"],
            "eta",
        ),
        (vec!["txt2img", "a cat", "--sampler", "fast"], "--sampler"),
    ] {
        let (code, stderr) = run_diffuse(&args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Fuzzing finding: a scheduler config with one training step overflowed an index while
/// building a sampler; it is refused when read.
#[test]
fn a_one_step_training_schedule_is_refused() {
    let err = error_text(diffuse::sampler::SchedulerConfig::from_json_str(
        r#"{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1}"#,
    ));
    assert!(
        err.contains("num_train_timesteps") && err.contains("at least 2"),
        "{err}"
    );
}
