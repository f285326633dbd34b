//! Properties every sampler must have, checked against the closed-form ideal denoiser of
//! Gaussian data x_0 ~ N(mu, s^2 I).

mod common;

use candle_core::Tensor;
use common::oracle::{mean_std, GaussianOracle, Labels};
use diffuse::sampler::{
    build_sampler, FnDenoiser, PredictionType, SamplerKind, SamplerOptions, SchedulerConfig,
    SeededNoise, StepEvent,
};

const MU: f64 = 1.0;
const S: f64 = 0.5;

/// DDPM's setup (linear betas 1e-4..0.02, T = 1000): its terminal SNR is small enough (sigma_max
/// = 157) that starting from N(0, sigma_max^2) instead of the true x_T shifts the final mean by
/// only mu s / sigma_max = 0.003. Clipping is off because the data leave [-1, 1].
fn ddpm_config() -> SchedulerConfig {
    SchedulerConfig::from_json_str(r#"{"beta_schedule": "linear", "clip_sample": false}"#).unwrap()
}

fn discrete_oracle(config: &SchedulerConfig) -> GaussianOracle {
    GaussianOracle {
        mu: MU,
        s: S,
        labels: Labels::Discrete(config.noise_schedule().unwrap().sigmas()),
    }
}

/// Draws `n` x 4 samples with the ideal predictor; returns them and the number of model
/// evaluations.
fn draw(
    kind: SamplerKind,
    config: &SchedulerConfig,
    oracle: &GaussianOracle,
    options: &SamplerOptions,
    steps: usize,
    n: usize,
    seed: u64,
) -> (Tensor, usize) {
    let sampler = build_sampler(kind, config, options, steps).unwrap();
    let mut noise = SeededNoise::new(seed);
    let x_start = noise
        .randn(&[n, 4])
        .unwrap()
        .affine(sampler.init_noise_sigma(), 0.0)
        .unwrap();
    let mut evaluations = 0;
    let use_score = matches!(oracle.labels, Labels::Ve);
    let mut model = FnDenoiser {
        prediction_type: if use_score {
            PredictionType::Score
        } else {
            PredictionType::Epsilon
        },
        f: |x: &Tensor, t: f64| {
            evaluations += 1;
            if use_score {
                oracle.score(x, t)
            } else {
                oracle.epsilon(x, t)
            }
        },
    };
    let out = sampler
        .sample(&mut model, x_start, &mut noise, &mut |_: &StepEvent| Ok(()))
        .unwrap();
    (out, evaluations)
}

/// The tolerance. N = 16,000 draws (4,000 rows of 4 independent coordinates): the sample mean
/// has standard error s / sqrt(N) = 0.0040 and the sample standard deviation s / sqrt(2N) =
/// 0.0028. We allow 5 standard errors (a correct sampler fails by chance with probability
/// below 1e-6) plus a discretisation allowance of 0.02 s = 0.01 for 250 steps. The largest
/// bias seen is ancestral sampling's (ddpm, euler-a: std 0.489): the posterior variance
/// beta~_t under-disperses when steps are strided (at 50 steps std falls to 0.44).
fn tolerances() -> (f64, f64) {
    let count = 16_000f64;
    let allowance = 0.02 * S;
    (
        5.0 * S / count.sqrt() + allowance,
        5.0 * S / (2.0 * count).sqrt() + allowance,
    )
}

/// Annealed Langevin dynamics mixes slowly (its per-step contraction is 2 r^2 sigma^2 / s^2 at
/// small sigma), so it gets what NCSN used: many levels, several steps each, a larger r.
fn options_for(kind: SamplerKind) -> (SamplerOptions, usize) {
    match kind {
        SamplerKind::Ald => (
            SamplerOptions {
                snr: Some(0.3),
                corrector_steps: Some(4),
                ..Default::default()
            },
            1000,
        ),
        _ => (SamplerOptions::default(), 250),
    }
}

#[test]
fn every_sampler_reproduces_gaussian_data() {
    let (tol_mean, tol_std) = tolerances();
    let config = ddpm_config();
    let oracle = discrete_oracle(&config);
    let mut failures = Vec::new();
    let mut runs: Vec<(String, SamplerKind, SamplerOptions, usize)> = SamplerKind::ALL
        .into_iter()
        .map(|k| {
            let (options, steps) = options_for(k);
            (k.cli_name().to_string(), k, options, steps)
        })
        .collect();
    runs.push((
        "ddim eta=1".into(),
        SamplerKind::Ddim,
        SamplerOptions {
            eta: 1.0,
            ..Default::default()
        },
        250,
    ));
    for (name, kind, options, steps) in runs {
        let (x, evals) = draw(kind, &config, &oracle, &options, steps, 4000, 7);
        let (mean, std) = mean_std(&x);
        eprintln!(
            "{name:>10}: mean {mean:.4} (want {MU}), std {std:.4} (want {S}), {evals} evaluations"
        );
        if (mean - MU).abs() > tol_mean || (std - S).abs() > tol_std {
            failures.push(format!("{name}: mean {mean:.4}, std {std:.4}"));
        }
    }
    assert!(
        failures.is_empty(),
        "tolerance mean {tol_mean:.4}, std {tol_std:.4}: {failures:?}"
    );
}

#[test]
fn score_sde_families_reproduce_gaussian_data() {
    let (tol_mean, tol_std) = tolerances();
    let vp = SchedulerConfig::from_json_str(r#"{"_class_name": "ScoreSdeVpScheduler"}"#).unwrap();
    let vp_oracle = GaussianOracle {
        mu: MU,
        s: S,
        labels: Labels::VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
        },
    };
    let ve = SchedulerConfig::from_json_str(
        r#"{"_class_name": "ScoreSdeVeScheduler", "sigma_max": 20.0, "sigma_min": 0.01}"#,
    )
    .unwrap();
    let ve_oracle = GaussianOracle {
        mu: MU,
        s: S,
        labels: Labels::Ve,
    };
    let mut failures = Vec::new();
    for (name, config, oracle) in [("vp", &vp, &vp_oracle), ("ve", &ve, &ve_oracle)] {
        for kind in [SamplerKind::Sde, SamplerKind::Pc, SamplerKind::Ald] {
            let (options, steps) = options_for(kind);
            let (x, evals) = draw(kind, config, oracle, &options, steps, 4000, 3);
            let (mean, std) = mean_std(&x);
            eprintln!(
                "{name} {}: mean {mean:.4}, std {std:.4}, {evals} evaluations",
                kind.cli_name()
            );
            if (mean - MU).abs() > tol_mean || (std - S).abs() > tol_std {
                failures.push(format!(
                    "{name} {}: mean {mean:.4}, std {std:.4}",
                    kind.cli_name()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Error of a deterministic sampler at the last nonzero sigma against the exact probability-flow
/// ODE solution, and the evaluations spent getting there.
fn ode_error(kind: SamplerKind, steps: usize, options: &SamplerOptions) -> (f64, usize) {
    let config = ddpm_config();
    let oracle = discrete_oracle(&config);
    let sampler = build_sampler(kind, &config, options, steps).unwrap();
    let mut noise = SeededNoise::new(11);
    let sigma_max = sampler.init_noise_sigma();
    let x_start = noise
        .randn(&[64, 4])
        .unwrap()
        .affine(sigma_max, 0.0)
        .unwrap();
    // Where the grid stops before its final jump to sigma = 0.
    let schedule = config.noise_schedule().unwrap();
    let sigma_min = schedule.sigma_at(0.0);
    let exact = oracle.ode_solution(&x_start, sigma_max, sigma_min).unwrap();
    let mut evaluations = 0;
    let mut model = FnDenoiser {
        prediction_type: PredictionType::Epsilon,
        f: |x: &Tensor, t: f64| {
            evaluations += 1;
            oracle.epsilon(x, t)
        },
    };
    let mut events: Vec<Tensor> = Vec::new();
    let mut record = |e: &StepEvent| {
        events.push(e.sample.clone());
        Ok(())
    };
    sampler
        .sample(&mut model, x_start, &mut noise, &mut record)
        .unwrap();
    // Euler and Heun end with one Euler step from sigma_min to 0 (the last event), RK45 with one
    // denoising evaluation after its last accepted step: both are left out.
    let at_sigma_min = match kind {
        SamplerKind::Rk45 => &events[events.len() - 1],
        _ => &events[events.len() - 2],
    };
    (common::max_abs_diff(at_sigma_min, &exact), evaluations - 1)
}

/// Euler is first order and Heun second: doubling the steps divides the error by about 2 and 4.
#[test]
fn ode_solvers_show_their_order() {
    let options = SamplerOptions::default();
    for (kind, expected) in [(SamplerKind::Euler, 2.0), (SamplerKind::Heun, 4.0)] {
        let errors: Vec<f64> = [25, 50, 100]
            .iter()
            .map(|n| ode_error(kind, *n, &options).0)
            .collect();
        let ratios = [errors[0] / errors[1], errors[1] / errors[2]];
        eprintln!("{}: errors {errors:?}, ratios {ratios:?}", kind.cli_name());
        for r in ratios {
            assert!(
                (r / expected - 1.0).abs() < 0.25,
                "{}: error ratio {r:.2} on doubling the steps, expected about {expected}",
                kind.cli_name()
            );
        }
    }
}

/// RK45 at rtol = atol = 1e-4 reaches a given error with under a quarter of the evaluations
/// fixed-step Heun needs (seen: 86 against 418).
#[test]
fn rk45_meets_tolerance_with_fewer_evaluations_than_heun() {
    let options = SamplerOptions {
        rtol: 1e-4,
        atol: 1e-4,
        ..Default::default()
    };
    let (rk_err, rk_evals) = ode_error(SamplerKind::Rk45, 50, &options);
    // The global error stays within a small multiple of the requested local tolerance times the
    // solution's scale (|x| <= ~3 here).
    assert!(rk_err < 10.0 * (1e-4 + 1e-4 * 3.0), "rk45 error {rk_err:e}");
    let mut heun_evals_needed = None;
    for steps in (5..=500).step_by(5) {
        let (err, evals) = ode_error(SamplerKind::Heun, steps, &SamplerOptions::default());
        if err <= rk_err {
            heun_evals_needed = Some((steps, evals));
            break;
        }
    }
    let (heun_steps, heun_evals) = heun_evals_needed.expect("heun reaches rk45's error");
    eprintln!(
        "rk45: error {rk_err:.2e} with {rk_evals} evaluations; heun needs {heun_steps} steps, \
         {heun_evals} evaluations"
    );
    assert!(
        4 * rk_evals <= heun_evals,
        "rk45 {rk_evals} vs heun {heun_evals}: not under a quarter"
    );
}
