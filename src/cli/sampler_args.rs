//! The sampler options every generating command shares.

use crate::sampler::SamplerOptions;
use clap::Args;
use std::path::PathBuf;

/// One line per sampler on when to use it (`diffuse samplers`, README).
pub const SAMPLER_GUIDE: [(&str, &str); 13] = [
    ("ddpm", "DDPM ancestral sampling (Ho et al. 2020): the reference; needs hundreds of steps"),
    ("ddim", "DDIM (Song et al. 2021): deterministic at eta 0, good from 20-50 steps; --eta 1 is DDPM-like"),
    ("pndm", "PLMS (Liu et al. 2022): SD 1.x's default; 4th-order multistep, fine at 50 steps"),
    ("lms", "linear multistep on the sigma ODE: smooth results at 20-50 steps"),
    ("euler", "Euler on the probability-flow ODE: simple and robust, 20-50 steps"),
    ("euler-a", "Euler ancestral: adds fresh noise each step; varied, softer images; not convergent in steps"),
    ("heun", "Heun (Karras et al. 2022): 2nd order, 2 evaluations a step; accurate at 10-30 steps"),
    ("dpmpp-2m", "DPM-Solver++(2M): the best quality for few steps (15-25), with --karras"),
    ("unipc", "UniPC: predictor-corrector multistep; strongest at very few steps (5-15)"),
    ("rk45", "adaptive Dormand-Prince on the ODE: set accuracy by --rtol/--atol; reports evaluations"),
    ("sde", "reverse-SDE Euler-Maruyama (Song et al. 2021): stochastic, needs many steps"),
    ("pc", "predictor-corrector (Song et al. 2021, Alg. 2/3): reverse diffusion + Langevin; best SDE quality"),
    ("ald", "annealed Langevin dynamics (NCSN): corrector only; needs many steps and corrector iterations"),
];

#[derive(Debug, Clone, Args)]
pub struct SamplerArgs {
    /// Sampler: ddpm, ddim, pndm, lms, euler, euler-a, heun, dpmpp-2m, unipc, rk45, sde, pc, ald
    /// (default: the one the model's scheduler config names).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Number of sampling steps (for rk45: the grid it starts from; its steps adapt); default
    /// 50, or the model preset's.
    #[arg(long)]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub tuning: SamplerTuning,
    /// A diffusers scheduler_config.json that overrides the model's.
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
}

/// Per-sampler settings beyond the name and step count.
#[derive(Debug, Clone, Args)]
pub struct SamplerTuning {
    /// DDIM's eta: 0 deterministic, 1 DDPM's variance.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
    /// Karras et al. 2022 sigma spacing (sigma-based samplers).
    #[arg(long)]
    pub karras: bool,
    /// RK45 relative tolerance.
    #[arg(long, default_value_t = 1e-4)]
    pub rtol: f64,
    /// RK45 absolute tolerance.
    #[arg(long, default_value_t = 1e-4)]
    pub atol: f64,
    /// Langevin corrector signal-to-noise ratio (pc, ald).
    #[arg(long)]
    pub snr: Option<f64>,
    /// Corrector iterations per step (pc, ald).
    #[arg(long)]
    pub corrector_steps: Option<usize>,
}

impl SamplerTuning {
    pub fn options(&self) -> SamplerOptions {
        SamplerOptions {
            eta: self.eta,
            karras: self.karras,
            rtol: self.rtol,
            atol: self.atol,
            snr: self.snr,
            corrector_steps: self.corrector_steps,
            ..Default::default()
        }
    }
}
