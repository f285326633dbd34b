//! `diffuse serve`: the flags onto the server's settings; the server is `crate::serve`.

use super::single_file_args::SingleFileArgs;
use crate::pipeline::LoadOptions;
use crate::serve::models::{scan_loras, scan_models, ModelChoice, ModelEntry, ModelStore};
use crate::serve::{jobs, Access, AppState, Limits};
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model served by default: as `txt2img --model` takes it (default: the embedded model).
    #[arg(long)]
    pub model: Option<String>,
    /// A folder of more models clients may pick: diffusers folders and .safetensors files.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// A folder of LoRA .safetensors files, used by `<lora:NAME:WEIGHT>` in prompts.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    #[command(flatten)]
    pub single_file: SingleFileArgs,
    /// Address and port to listen on; port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub listen: SocketAddr,
    /// A key every API call must carry as `Authorization: Bearer KEY` (also from the
    /// DIFFUSE_API_KEY environment variable). Needed to listen beyond this machine.
    #[arg(long, env = "DIFFUSE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Listen beyond this machine without a key.
    #[arg(long)]
    pub no_auth: bool,
    /// Let pages from this origin (or "*") call the API from a browser (CORS; off by default).
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
    /// Jobs that may wait; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue_size: usize,
    /// Generations run at once (1 on a CPU: one already uses every core).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Loaded models kept at once (each other model or LoRA set is a load).
    #[arg(long, default_value_t = 1)]
    pub keep_models: usize,
    /// Largest width or height a request may ask for.
    #[arg(long, default_value_t = 2048)]
    pub max_side: usize,
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// Most images one request may ask for.
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    #[arg(long, default_value_t = 4000)]
    pub max_prompt_chars: usize,
    /// Largest request body, in MiB (base64 images included).
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Weights dtype of the text encoder and U-Net: f32, f16, bf16 or q8. On a CPU, bf16 runs
    /// its products on AMX tiles or with AVX512_BF16 where the CPU has them (about half f32's
    /// time) and is held as f32 where it has neither. q8 holds linear and convolution weights as
    /// 8-bit integers with a scale per output channel (a quarter of f32's memory), quantized as
    /// they load (or read from a `diffuse convert --dtype q8` folder), products as bf16's.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value = "f32")]
    pub vae_dtype: String,
    /// Decode with TAESD (an AutoencoderTiny folder or hub id) instead of the VAE: fast previews
    /// and pictures.
    #[arg(long, value_name = "DIR_OR_ID", conflicts_with = "preview_decoder")]
    pub vae_decoder: Option<String>,
    /// TAESD for progress previews only (final pictures keep the VAE).
    #[arg(long, value_name = "DIR_OR_ID")]
    pub preview_decoder: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let access = Access {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        cors_origin: args.cors_origin.clone(),
    };
    crate::serve::check_exposure(&args.listen, &access, args.no_auth)?;
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(args.queue_size >= 1, "--queue-size must be at least 1");
    let mut models = vec![ModelEntry::for_model_flag(args.model.as_deref())?];
    if let Some(dir) = &args.models_dir {
        for entry in scan_models(dir)? {
            if models.iter().all(|m| m.name != entry.name) {
                models.push(entry);
            }
        }
    }
    let loras = match &args.lora_dir {
        Some(dir) => scan_loras(dir)?,
        None => Vec::new(),
    };
    let (dtype, q8) = super::parse_weights_dtype("--dtype", &args.dtype)?;
    let load = LoadOptions {
        dtype,
        q8,
        vae_dtype: super::parse_dtype("--vae-dtype", &args.vae_dtype)?,
        device: super::parse_device(&args.device)?,
        loras: Vec::new(),
        vae_decoder: args.vae_decoder.clone(),
        preview_decoder: args.preview_decoder.clone(),
    };
    let store = Arc::new(ModelStore::new(
        models,
        loras,
        load,
        args.single_file.options()?,
        args.keep_models,
    )?);
    // Load the default model now: a broken model fails the start, not the first request.
    store.get(&ModelChoice {
        model: store.current(),
        loras: Vec::new(),
    })?;
    let queue = Arc::new(jobs::JobQueue::new(args.queue_size));
    let workers = jobs::start_workers(queue.clone(), store.clone(), args.workers);
    let state = Arc::new(AppState {
        store,
        queue: queue.clone(),
        limits: Limits {
            body_bytes: args.max_body_mib << 20,
            max_side: args.max_side,
            max_steps: args.max_steps,
            max_images: args.max_images,
            max_prompt_chars: args.max_prompt_chars,
        },
        access,
        preview_cache: Mutex::new(None),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        let address = listener.local_addr()?;
        println!("listening on http://{address}");
        eprintln!(
            "A1111 API at http://{address}/sdapi/v1/, OpenAI images API at \
             http://{address}/v1/, web page at http://{address}/ (Ctrl-C stops)"
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        crate::serve::serve(state, listener, shutdown_signal()).await
    })?;
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    eprintln!("stopping: finishing the running job(s)");
}
