//! The sampler options every generating command shares.

use crate::sampler::SamplerOptions;
use clap::Args;
use std::path::PathBuf;

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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// `--sampler`'s help lists exactly the registry's names, in its order.
    #[test]
    fn the_sampler_flag_lists_the_registry() {
        let command = SamplerArgs::augment_args(clap::Command::new("txt2img"));
        let help = command
            .get_arguments()
            .find(|a| a.get_id() == "sampler")
            .and_then(|a| a.get_help())
            .expect("--sampler has help")
            .to_string();
        let names: Vec<&str> = crate::sampler::registry::REGISTRY
            .iter()
            .map(|e| e.name)
            .collect();
        assert!(help.contains(&names.join(", ")), "{help}");
    }
}
