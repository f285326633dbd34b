use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    diffuse::ops::runtime::keep_freed_memory();
    match diffuse::cli::run(diffuse::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => diffuse::cli::report(e),
    }
}
