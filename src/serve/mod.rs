//! `diffuse serve`: models stay loaded behind an HTTP server that speaks AUTOMATIC1111's
//! `/sdapi/v1` API, OpenAI's images API and a small job API for its own web page.
//!
//! axum on tokio: the most used async HTTP stack in Rust, kept by the tokio project, with
//! typed JSON extraction whose errors name the field at fault. Generation itself runs on
//! worker threads ([`jobs`]), so the async side never blocks.

pub mod a1111;
pub mod http;
pub mod jobs;
pub mod models;
pub mod openai;
pub mod page;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Caps on what one request may ask for; over a cap is a 422 naming the field.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request bodies (base64 images included).
    pub body_bytes: usize,
    /// Width and height.
    pub max_side: usize,
    pub max_steps: usize,
    /// Images one request makes (batch size x iterations, or n).
    pub max_images: usize,
    /// Characters of a prompt or negative prompt.
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 32 << 20,
            max_side: 2048,
            max_steps: 150,
            max_images: 8,
            max_prompt_chars: 4000,
        }
    }
}

/// How the server is reached and protected.
#[derive(Debug, Clone)]
pub struct Access {
    /// Bearer token every API call must carry, when set.
    pub api_key: Option<String>,
    /// An origin whose pages may call the API from a browser (CORS), or "*".
    pub cors_origin: Option<String>,
}

/// Listening beyond this machine needs a key, or a stated wish to go without one.
pub fn check_exposure(listen: &SocketAddr, access: &Access, no_auth: bool) -> anyhow::Result<()> {
    if listen.ip().is_loopback() || access.api_key.is_some() || no_auth {
        return Ok(());
    }
    anyhow::bail!(
        "--listen {listen} reaches beyond this machine: give --api-key KEY (clients then send \
         `Authorization: Bearer KEY`) or --no-auth to serve without one"
    )
}

/// Everything a request handler sees.
pub struct AppState {
    pub store: Arc<models::ModelStore>,
    pub queue: Arc<jobs::JobQueue>,
    pub limits: Limits,
    pub access: Access,
    /// The latest preview made: (job id, step, base64 PNG), so polls within a step share it.
    pub preview_cache: Mutex<Option<(u64, usize, String)>>,
}

pub type State = Arc<AppState>;

/// A mutex's guard, also after a panic elsewhere left it poisoned: every value the server
/// guards stays readable after any one update.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The whole HTTP surface.
pub fn router(state: State) -> anyhow::Result<Router> {
    let api = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::interrupt))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/images/generations", post(openai::generations))
        .route("/api/v1/jobs", post(page::submit))
        .route("/api/v1/jobs/{id}", get(page::job).delete(page::cancel))
        .route("/api/v1/jobs/{id}/images/{index}", get(page::image))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::require_key,
        ));
    let mut app = Router::new()
        .route("/", get(page::index))
        .merge(api)
        .fallback(http::not_found)
        .layer(DefaultBodyLimit::max(state.limits.body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::limit_declared_length,
        ))
        .with_state(state.clone());
    if let Some(origin) = &state.access.cors_origin {
        app = app.layer(http::cors(origin)?);
    }
    Ok(app)
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets the running jobs end.
pub async fn serve(
    state: State,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = router(state.clone())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    state.queue.shut_down();
    Ok(())
}
