//! `txt2img`: text to PNG. The model code lands with the Stable Diffusion pipeline; until then
//! the command checks its arguments and says plainly that it cannot generate yet.

use super::sampler_args::SamplerArgs;
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct Txt2imgArgs {
    /// The prompt.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
}

pub fn run(args: Txt2imgArgs) -> anyhow::Result<()> {
    args.sampler.kind()?;
    anyhow::bail!(
        "txt2img is not yet available: the Stable Diffusion pipeline (text encoder, U-Net, VAE) \
         has not landed; `diffuse toy swiss-roll` runs the samplers today"
    )
}
