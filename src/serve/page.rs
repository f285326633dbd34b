//! The web page at `/` (one self-contained HTML file compiled into the binary: no CDN, works
//! offline) and the job API it drives: submit, poll with a preview, cancel.

use super::a1111::{preview, A1111Request};
use super::http::{base64_png, enqueue, json_body, ApiError, ApiResult};
use super::State;
use axum::extract::rejection::JsonRejection;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

const PAGE: &str = include_str!("page.html");

pub async fn index() -> Html<&'static str> {
    Html(PAGE)
}

/// Queues an A1111-shaped txt2img (or, with `init_images`, img2img) request and answers at
/// once (202) with the job's id.
pub async fn submit(
    axum::extract::State(state): axum::extract::State<State>,
    body: Result<Json<A1111Request>, JsonRejection>,
) -> ApiResult<Response> {
    let body = json_body(body)?;
    let img2img = !body.init_images.is_empty();
    let spec = body.to_job(&state, img2img)?;
    let job = enqueue(&state, spec)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": job.id}))).into_response())
}

fn find(state: &State, id: u64) -> ApiResult<std::sync::Arc<super::jobs::Job>> {
    state.queue.get(id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {id} (finished jobs are kept for a while, then forgotten)"),
        )
    })
}

/// A job's state, progress, preview while it runs, and its images (base64 PNG with their
/// parameters) as they finish.
pub async fn job(
    axum::extract::State(state): axum::extract::State<State>,
    Path(id): Path<u64>,
) -> ApiResult<Json<Value>> {
    let job = find(&state, id)?;
    let status = job.status();
    let ahead = match status.phase {
        super::jobs::Phase::Queued => Some(state.queue.waiting_len()),
        _ => None,
    };
    let preview = match status.phase {
        super::jobs::Phase::Running => preview(&state, id, &status).await,
        _ => None,
    };
    let images: Vec<Value> = status
        .images
        .iter()
        .map(|i| json!({"png": base64_png(&i.png), "seed": i.seed, "prompt": i.prompt, "parameters": i.parameters}))
        .collect();
    Ok(Json(json!({
        "id": id,
        "state": status.phase,
        "progress": status.fraction(),
        "eta": status.eta_seconds(),
        "step": status.step,
        "steps": status.steps,
        "queued": ahead,
        "preview": preview,
        "images": images,
        "model": status.model_name,
        "error": status.error,
        "warnings": status.warnings,
    })))
}

pub async fn cancel(
    axum::extract::State(state): axum::extract::State<State>,
    Path(id): Path<u64>,
) -> ApiResult<Json<Value>> {
    let job = find(&state, id)?;
    job.cancel();
    Ok(Json(json!({"id": id, "cancelled": true})))
}

/// One finished image as a PNG file download.
pub async fn image(
    axum::extract::State(state): axum::extract::State<State>,
    Path((id, index)): Path<(u64, usize)>,
) -> ApiResult<Response> {
    let job = find(&state, id)?;
    let status = job.status();
    let Some(image) = status.images.get(index) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {id} has {} image(s) so far", status.images.len()),
        ));
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"diffuse-{id}-{index}-{}.png\"",
                    image.seed
                ),
            ),
        ],
        image.png.clone(),
    )
        .into_response())
}
