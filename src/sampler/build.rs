//! Building a sampler from a scheduler config, a sampler kind, a step count and the per-run
//! options.

use super::config::{SchedulerConfig, SdeFamily};
use super::ddim::Ddim;
use super::ddpm::Ddpm;
use super::dpm_solver::DpmSolverPlusPlus;
use super::euler::{Euler, EulerAncestral, KarrasRange, SigmaGrid};
use super::heun::Heun;
use super::lms::Lms;
use super::pc::{Corrector, Predictor, PredictorCorrector};
use super::pndm::Plms;
use super::registry::SamplerKind;
use super::rk45::Rk45;
use super::unipc::UniPc;
use super::Sampler;
use crate::diffusion::schedule::{
    multistep_timesteps, spaced_timesteps, BetaSchedule, TimestepSpacing,
};
use crate::diffusion::sde::{VeSde, VpBeta, VpSde};
use crate::error::{Error, Result};

impl SamplerKind {
    fn default_spacing(self) -> TimestepSpacing {
        match self {
            Self::Ddpm | Self::Ddim | Self::Pndm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        }
    }
}

/// Sampling options given per run rather than per model.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    /// DDIM's eta (0 deterministic, 1 DDPM-like).
    pub eta: f64,
    /// Karras et al. 2022 sigma spacing for the sigma-based samplers.
    pub karras: bool,
    /// RK45 tolerances.
    pub rtol: f64,
    pub atol: f64,
    /// Corrector signal-to-noise ratio; `None` takes the config's.
    pub snr: Option<f64>,
    /// Corrector iterations per step; `None` takes the config's.
    pub corrector_steps: Option<usize>,
    /// Image-to-image strength in (0, 1]: the fraction of the steps that run, the first
    /// `steps - floor(steps * strength)` being skipped (diffusers' `get_timesteps`). 1 starts
    /// from pure noise.
    pub strength: f64,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            eta: 0.0,
            karras: false,
            rtol: 1e-4,
            atol: 1e-4,
            snr: None,
            corrector_steps: None,
            strength: 1.0,
        }
    }
}

fn as_indices(timesteps: Vec<f64>, n_train: usize) -> Result<Vec<usize>> {
    timesteps
        .into_iter()
        .map(|t| {
            if t >= 0.0 && (t as usize) < n_train {
                Ok(t as usize)
            } else {
                Err(Error::Contradiction(format!(
                    "timestep {t} falls outside 0..{n_train}: check steps_offset and timestep_spacing"
                )))
            }
        })
        .collect()
}

/// Builds `kind` for `steps` steps from a model's scheduler config.
pub fn build_sampler(
    kind: SamplerKind,
    config: &SchedulerConfig,
    options: &SamplerOptions,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    let n_train = config.num_train_timesteps;
    if steps == 0 || steps > n_train {
        return Err(Error::bad_value(
            "steps",
            steps,
            &format!("1 to {n_train} (the model's num_train_timesteps)"),
        ));
    }
    // Written so that NaN is refused too.
    if options.eta.is_nan() || options.eta < 0.0 {
        return Err(Error::bad_value("eta", options.eta, "a number >= 0"));
    }
    if options.eta > 0.0 && kind != SamplerKind::Ddim {
        return Err(Error::Contradiction(format!(
            "eta = {} is only used by ddim, not {}",
            options.eta,
            kind.cli_name()
        )));
    }
    if !(options.strength > 0.0 && options.strength <= 1.0) {
        return Err(Error::bad_value(
            "strength",
            options.strength,
            "a number in (0, 1]",
        ));
    }
    // Steps that run: floor(steps * strength), at least one.
    let skip = steps - ((steps as f64 * options.strength) as usize).clamp(1, steps);
    let karras = options.karras || config.use_karras_sigmas;
    if options.karras && !kind.uses_sigmas() {
        return Err(Error::Contradiction(format!(
            "--karras applies to the sigma-based samplers (lms, euler, euler-a, heun, dpmpp-2m, \
             unipc, rk45), not {}",
            kind.cli_name()
        )));
    }
    if !(options.rtol > 0.0 && options.atol > 0.0) {
        return Err(Error::bad_value(
            "rtol/atol",
            format!("{}/{}", options.rtol, options.atol),
            "positive numbers",
        ));
    }
    let is_sde = matches!(kind, SamplerKind::Sde | SamplerKind::Pc | SamplerKind::Ald);
    if config.sde != SdeFamily::Discrete && !is_sde {
        return Err(Error::Contradiction(format!(
            "a score-SDE scheduler config ({}) drives only sde, pc and ald, not {}",
            config.class_name.as_deref().unwrap_or("?"),
            kind.cli_name()
        )));
    }
    if is_sde || kind == SamplerKind::Rk45 {
        if skip > 0 {
            return Err(Error::Contradiction(format!(
                "strength = {} (image-to-image) is not supported by {}; use ddpm, ddim, pndm, \
                 lms, euler, euler-a, heun, dpmpp-2m or unipc",
                options.strength,
                kind.cli_name()
            )));
        }
        if is_sde {
            return build_score_sde(kind, config, options, steps);
        }
    }
    let schedule = config.noise_schedule()?;
    let spacing = config
        .timestep_spacing
        .unwrap_or_else(|| kind.default_spacing());
    let offset = config.steps_offset;
    let timesteps = || spaced_timesteps(spacing, n_train, steps, offset)[skip..].to_vec();
    let stride = n_train / steps;
    let final_alpha_cumprod = if config.set_alpha_to_one {
        1.0
    } else {
        schedule.alphas_cumprod[0]
    };
    let discrete_grid =
        || SigmaGrid::discrete(&schedule, spacing, steps, offset, karras).skip(skip);
    let multistep_grid = |clip_lambda: bool| {
        let round = !matches!(config.beta_schedule, BetaSchedule::SquaredCosCapV2);
        let last_timestep = if clip_lambda {
            let clipped = schedule
                .log_snr()
                .iter()
                .filter(|l| 0.5 * **l < config.lambda_min_clipped)
                .count();
            n_train - clipped
        } else {
            n_train
        };
        SigmaGrid::from_timesteps(
            &schedule,
            multistep_timesteps(spacing, last_timestep, steps, offset),
            karras.then_some(KarrasRange::Training),
            round,
        )
        .skip(skip)
    };
    Ok(match kind {
        SamplerKind::Ddpm => Box::new(Ddpm {
            timesteps: as_indices(timesteps(), n_train)?,
            variance: config.variance_type,
            clip: config.x0_clip(kind),
            schedule,
        }),
        SamplerKind::Ddim => Box::new(Ddim {
            timesteps: as_indices(timesteps(), n_train)?,
            stride,
            eta: options.eta,
            final_alpha_cumprod,
            clip: config.x0_clip(kind),
            schedule,
        }),
        SamplerKind::Pndm => Box::new(Plms {
            base_timesteps: as_indices(timesteps(), n_train)?,
            stride,
            final_alpha_cumprod,
            schedule,
        }),
        SamplerKind::Lms => Box::new(Lms {
            grid: discrete_grid(),
            order: 4,
        }),
        SamplerKind::Euler => Box::new(Euler {
            grid: discrete_grid(),
        }),
        SamplerKind::EulerAncestral => Box::new(EulerAncestral {
            grid: discrete_grid(),
        }),
        SamplerKind::Heun => Box::new(Heun {
            grid: discrete_grid(),
        }),
        SamplerKind::DpmPp2m => Box::new(DpmSolverPlusPlus {
            grid: multistep_grid(true),
            order: config.solver_order.min(2),
            form: config.second_order_form,
            lower_order_final: config.lower_order_final,
        }),
        SamplerKind::UniPc => Box::new(UniPc {
            grid: multistep_grid(false),
            order: config.solver_order,
            b_function: config.b_function,
            lower_order_final: config.lower_order_final,
        }),
        SamplerKind::Rk45 => {
            let grid = discrete_grid();
            Box::new(Rk45::new(&grid, schedule, options.rtol, options.atol))
        }
        SamplerKind::Sde | SamplerKind::Pc | SamplerKind::Ald => unreachable!("handled above"),
    })
}

fn build_score_sde(
    kind: SamplerKind,
    config: &SchedulerConfig,
    options: &SamplerOptions,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    let (predictor, corrector) = match kind {
        SamplerKind::Sde => (Predictor::EulerMaruyama, Corrector::None),
        SamplerKind::Pc => (Predictor::ReverseDiffusion, Corrector::Langevin),
        _ => (Predictor::None, Corrector::AnnealedLangevin),
    };
    let snr = options.snr.unwrap_or(config.snr);
    if snr.is_nan() || snr <= 0.0 {
        return Err(Error::bad_value("snr", snr, "a positive number"));
    }
    let corrector_steps = options.corrector_steps.unwrap_or(config.correct_steps);
    let name = kind.cli_name();
    Ok(match &config.sde {
        SdeFamily::Ve {
            sigma_min,
            sigma_max,
        } => Box::new(PredictorCorrector {
            sde: VeSde {
                sigma_min: *sigma_min,
                sigma_max: *sigma_max,
                sampling_eps: config.sampling_eps.unwrap_or(1e-5),
            },
            steps,
            predictor,
            corrector,
            snr,
            corrector_steps,
            name,
        }),
        family => {
            let beta = match family {
                SdeFamily::VpContinuous { beta_min, beta_max } => VpBeta::Linear {
                    beta_min: *beta_min,
                    beta_max: *beta_max,
                },
                _ => VpBeta::Table(config.noise_schedule()?),
            };
            Box::new(PredictorCorrector {
                sde: VpSde {
                    beta,
                    sampling_eps: config.sampling_eps.unwrap_or(1e-3),
                },
                steps,
                predictor,
                corrector,
                snr,
                corrector_steps,
                name,
            })
        }
    })
}
