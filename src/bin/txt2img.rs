//! `txt2img ...` is `diffuse txt2img ...`.
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "txt2img",
    version,
    about = "Generate images from a text prompt"
)]
struct Args {
    #[command(flatten)]
    inner: diffuse::cli::txt2img::Txt2imgArgs,
}

fn main() -> std::process::ExitCode {
    diffuse::ops::runtime::keep_freed_memory();
    match diffuse::cli::txt2img::run(Args::parse().inner) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => diffuse::cli::report(e),
    }
}
