//! Every sampler against the trajectories diffusers recorded (tests/fixtures/
//! scheduler_reference.safetensors, copied from shared/fixtures/tiny-sd/reference.safetensors).
//!
//! Model: f(x, t) = 0.5 tanh(x) + 0.01 t / 1000; noise: the recorded draws, replayed in order.

mod common;

use candle_core::Tensor;
use common::{max_abs_diff, Fixture};
use diffuse::ops::tensor::max_abs;
use diffuse::sampler::{
    build_sampler, FnDenoiser, PredictionType, ReplayNoise, SamplerKind, SamplerOptions,
    SchedulerConfig, StepEvent,
};

fn fixture() -> Fixture {
    Fixture::load("scheduler_reference.safetensors")
}

fn analytic_model(x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    x.tanh()?.affine(0.5, 0.01 * t / 1000.0)
}

fn rows(t: &Tensor) -> Vec<Tensor> {
    (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect()
}

fn assert_close_list(name: &str, ours: &[f64], theirs: &[f64], rel: f64) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{name}: lengths {ours:?} vs {theirs:?}"
    );
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let tol = rel * b.abs().max(1.0);
        assert!((a - b).abs() <= tol, "{name}[{i}]: ours {a}, diffusers {b}");
    }
}

fn run_case(case: &str) {
    let fx = fixture();
    let prefix = format!("sched/{case}");
    let class = fx.meta_str(&format!("{prefix}/class"));
    // diffusers writes `-Infinity` (not JSON) into some configs: the reader must take it as is.
    let mut config_text = fx.meta_str(&format!("{prefix}/config")).to_string();
    if !config_text.contains("_class_name") {
        config_text = config_text.replacen('{', &format!("{{\"_class_name\": \"{class}\", "), 1);
    }
    let config = SchedulerConfig::from_json_str(&config_text).unwrap();
    let step_kwargs: serde_json::Value =
        serde_json::from_str(fx.meta_str(&format!("{prefix}/step_kwargs"))).unwrap();
    let options = SamplerOptions {
        eta: step_kwargs
            .get("eta")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        ..Default::default()
    };
    let kind = SamplerKind::from_class_name(class).unwrap();
    let sampler = build_sampler(kind, &config, &options, 10).unwrap();

    // Schedule tables.
    if fx.has(&format!("{prefix}/alphas_cumprod")) {
        let ours = config.noise_schedule().unwrap().alphas_cumprod;
        assert_close_list(
            "alphas_cumprod",
            &ours,
            &fx.values_f64(&format!("{prefix}/alphas_cumprod")),
            1e-6,
        );
    }
    let init_sigma = fx.values_f64(&format!("{prefix}/init_noise_sigma"))[0];
    assert!(
        (sampler.init_noise_sigma() - init_sigma).abs() <= 1e-6 * init_sigma.max(1.0),
        "init_noise_sigma: ours {}, diffusers {init_sigma}",
        sampler.init_noise_sigma()
    );
    let model_t = fx.values_f64(&format!("{prefix}/model_t"));
    if kind.uses_sigmas()
        || matches!(
            kind,
            SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::Pndm
        )
    {
        let timesteps = fx.values_f64(&format!("{prefix}/timesteps"));
        assert_eq!(sampler.timesteps(), timesteps, "{case}: timesteps");
    }
    if let Some(sigmas) = sampler.sigmas() {
        assert_close_list(
            "sigmas",
            &sigmas,
            &fx.values_f64(&format!("{prefix}/sigmas")),
            1e-6,
        );
    }

    // The trajectory.
    let x_unit = fx.tensor("sched/x_unit").clone();
    let samples = fx.tensor(&format!("{prefix}/samples"));
    let scale = max_abs(samples).unwrap();
    let start = x_unit.affine(sampler.init_noise_sigma(), 0.0).unwrap();
    assert!(max_abs_diff(&start, &samples.get(0).unwrap()) <= 1e-6 * scale);
    let noises = if fx.has(&format!("{prefix}/noise")) {
        rows(fx.tensor(&format!("{prefix}/noise")))
    } else {
        vec![]
    };
    let n_noise = noises.len();
    let mut noise = ReplayNoise::new(noises);
    let mut calls: Vec<(Tensor, f64)> = Vec::new();
    let mut model = FnDenoiser {
        prediction_type: if case.starts_with("score_sde_ve") {
            PredictionType::Score
        } else {
            PredictionType::Epsilon
        },
        f: |x: &Tensor, t: f64| {
            calls.push((x.clone(), t));
            analytic_model(x, t)
        },
    };
    let mut trajectory: Vec<Tensor> = Vec::new();
    let mut record = |e: &StepEvent| {
        trajectory.push(e.sample.clone());
        Ok(())
    };
    sampler
        .sample(&mut model, start, &mut noise, &mut record)
        .unwrap();
    let expected = rows(samples);
    assert_eq!(
        trajectory.len(),
        expected.len() - 1,
        "{case}: number of steps"
    );
    let mut worst: f64 = 0.0;
    for (k, (ours, theirs)) in trajectory.iter().zip(&expected[1..]).enumerate() {
        let err = max_abs_diff(ours, theirs);
        worst = worst.max(err / scale);
        assert!(
            err <= 1e-5 * scale,
            "{case}: step {k}: max |ours - diffusers| = {err:e}, allowed {:e}",
            1e-5 * scale
        );
    }
    eprintln!("{case}: worst step error {worst:.2e} of the largest magnitude {scale:.3}");
    assert_eq!(noise.used(), n_noise, "{case}: noise draws");
    let model_in = rows(fx.tensor(&format!("{prefix}/model_in")));
    assert_eq!(calls.len(), model_in.len(), "{case}: model calls");
    let ours_t: Vec<f64> = calls.iter().map(|(_, t)| *t).collect();
    assert_close_list("model_t", &ours_t, &model_t, 1e-6);
    let in_scale = model_in
        .iter()
        .map(|t| max_abs(t).unwrap())
        .fold(0.0, f64::max);
    for (k, ((x, _), theirs)) in calls.iter().zip(&model_in).enumerate() {
        let err = max_abs_diff(x, theirs);
        assert!(
            err <= 1e-5 * in_scale,
            "{case}: model input {k} differs by {err:e}"
        );
    }
}

#[test]
fn ddpm() {
    run_case("ddpm");
}
#[test]
fn ddim_eta0() {
    run_case("ddim_eta0");
}
#[test]
fn ddim_eta1() {
    run_case("ddim_eta1");
}
#[test]
fn pndm_plms() {
    run_case("pndm_plms");
}
#[test]
fn euler() {
    run_case("euler");
}
#[test]
fn euler_ancestral() {
    run_case("euler_ancestral");
}
#[test]
fn heun() {
    run_case("heun");
}
#[test]
fn lms() {
    run_case("lms");
}
#[test]
fn dpmpp_2m() {
    run_case("dpmpp_2m");
}
#[test]
fn unipc() {
    run_case("unipc");
}
#[test]
fn score_sde_ve() {
    run_case("score_sde_ve");
}
#[test]
fn score_sde_vp() {
    run_case("score_sde_vp");
}
