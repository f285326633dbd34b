//! What every endpoint shares: errors as JSON, the API key, CORS, body parsing, limits,
//! base64 images, and running a job while the client waits.

use super::jobs::{CancelOnDrop, Job, JobSpec, JobStatus, Phase};
use super::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use std::sync::Arc;

/// An error answer. The body carries both shapes clients read: OpenAI's
/// `{"error": {"message", "type", "param"}}` and FastAPI's (A1111's) `{"detail"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Seconds after which to try again (with 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 422: a field's value is not acceptable.
    pub fn field(param: &str, message: impl std::fmt::Display) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{param}: {message}"),
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "server_busy",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        };
        let body = serde_json::json!({
            "error": {"message": self.message, "type": kind, "param": self.param, "code": null},
            "detail": self.message,
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The parsed body, or a 400 (not JSON), 415 (not sent as JSON), 413 (too large) or 422 (a
/// field of the wrong type, named with its path) saying what is wrong.
pub fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(value)| value).map_err(|rejection| {
        let status = rejection.status();
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                "the request body is over this server's limit (see --max-body-mib)".to_string()
            }
            _ => rejection.body_text(),
        };
        ApiError::new(status, message)
    })
}

/// Refuses API calls without the server's key (when it has one). The key is compared in
/// constant time.
pub async fn require_key(
    axum::extract::State(state): axum::extract::State<State>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let Some(key) = &state.access.api_key else {
        return next.run(request).await;
    };
    // Browsers send preflight requests without credentials.
    if request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let matches: bool =
        subtle::ConstantTimeEq::ct_eq(given.trim().as_bytes(), key.as_bytes()).into();
    if matches {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs its API key: send `Authorization: Bearer KEY`",
        )
        .into_response()
    }
}

/// Refuses a body whose declared length is over the limit before reading any of it (bodies
/// of unknown length are cut at the limit as they are read).
pub async fn limit_declared_length(
    axum::extract::State(state): axum::extract::State<State>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > state.limits.body_bytes as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body ({length} bytes) is over this server's limit of {} bytes (see \
                 --max-body-mib)",
                state.limits.body_bytes
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

pub fn cors(origin: &str) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = match origin {
        "*" => AllowOrigin::any(),
        one => AllowOrigin::exact(HeaderValue::from_str(one).map_err(|_| {
            anyhow::anyhow!("--cors-origin {one:?} is not a valid origin header value")
        })?),
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]))
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint {}", uri.path()))
}

/// `value` of `field` within 1..=max, else a 422 naming the field and the server's cap.
pub fn capped(field: &str, value: usize, max: usize) -> ApiResult<usize> {
    if value == 0 {
        return Err(ApiError::field(field, "must be at least 1"));
    }
    if value > max {
        return Err(ApiError::field(
            field,
            format!("{value} is over this server's limit of {max}"),
        ));
    }
    Ok(value)
}

/// A prompt within the server's length cap.
pub fn prompt_field(field: &str, text: &str, max_chars: usize) -> ApiResult<()> {
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(ApiError::field(
            field,
            format!("{chars} characters is over this server's limit of {max_chars}"),
        ));
    }
    Ok(())
}

/// A prompt's text without its `<lora:NAME:WEIGHT>` tags, and those LoRAs, each one the server
/// has; the prompt within the length cap and not empty.
pub fn prompt_and_loras(state: &State, text: &str) -> ApiResult<(String, Vec<(String, f64)>)> {
    prompt_field("prompt", text, state.limits.max_prompt_chars)?;
    let (prompt, loras) = super::models::take_lora_tags(text).map_err(|m| ApiError {
        param: Some("prompt".into()),
        ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m)
    })?;
    if prompt.trim().is_empty() {
        return Err(ApiError::field("prompt", "is empty"));
    }
    for (name, _) in &loras {
        state
            .store
            .find_lora(name)
            .map_err(|m| ApiError::field("prompt", m))?;
    }
    Ok((prompt, loras))
}

/// A base64 image (with or without a `data:image/...;base64,` prefix), decoded with the same
/// limits as image files.
pub fn decode_base64_image(field: &str, text: &str) -> ApiResult<image::DynamicImage> {
    let data = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::field(field, format!("not base64: {e}")))?;
    crate::image_io::decode_image_bytes(&bytes, field).map_err(|e| {
        ApiError::field(
            field,
            e.to_string().trim_start_matches(&format!("{field}: ")),
        )
    })
}

pub fn base64_png(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

/// Queues `spec`, or answers 503 with Retry-After when the queue is full.
pub fn enqueue(state: &State, spec: JobSpec) -> ApiResult<Arc<Job>> {
    state.queue.submit(spec).map_err(|full| ApiError {
        retry_after: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the queue is full ({} jobs waiting); try again shortly",
                full.capacity
            ),
        )
    })
}

/// Queues `spec` and waits for it; a client that goes away cancels it. A failed job is a 422
/// when the request was at fault, else a 500, with the reason.
pub async fn run_to_end(state: &State, spec: JobSpec) -> ApiResult<(Arc<Job>, JobStatus)> {
    let job = enqueue(state, spec)?;
    let guard = CancelOnDrop(Some(job.clone()));
    job.wait().await;
    guard.disarm();
    let status = job.status();
    if status.phase == Phase::Failed {
        let code = match status.request_fault {
            true => StatusCode::UNPROCESSABLE_ENTITY,
            false => StatusCode::INTERNAL_SERVER_ERROR,
        };
        return Err(ApiError::new(
            code,
            status.error.clone().unwrap_or_default(),
        ));
    }
    Ok((job, status))
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYYMMDDhhmmss` in UTC, as A1111's `job_timestamp`: the civil date of a day count by
/// H. Hinnant's `civil_from_days`.
pub fn compact_timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let seconds = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(compact_timestamp(0), "19700101000000");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(compact_timestamp(1_709_210_096), "20240229123456");
        assert_eq!(compact_timestamp(951_782_400), "20000229000000");
    }

    #[test]
    fn base64_images_are_checked_and_name_their_field() {
        let err = decode_base64_image("init_images[0]", "@@@").unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            err.message.starts_with("init_images[0]: not base64"),
            "{}",
            err.message
        );
        let err = decode_base64_image("mask", &base64_png(b"not a png")).unwrap_err();
        assert!(err.message.contains("mask: "), "{}", err.message);
        let image = image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let url = format!("data:image/png;base64,{}", base64_png(&png));
        let back = decode_base64_image("init_images[0]", &url)
            .unwrap()
            .to_rgb8();
        assert_eq!(back.dimensions(), (3, 2));
        assert_eq!(back.get_pixel(2, 1).0, [10, 20, 30]);
    }
}
