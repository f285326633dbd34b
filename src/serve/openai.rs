//! OpenAI's images API: `POST /v1/images/generations` and `GET /v1/models`, as the official
//! SDKs call them. Images come back as `b64_json`; this server keeps no files to link to.

use super::http::{
    base64_png, capped, json_body, prompt_and_loras, run_to_end, unix_seconds, ApiError, ApiResult,
};
use super::jobs::JobSpec;
use super::models::ModelChoice;
use super::State;
use crate::pipeline::request::GenerationRequest;
use axum::extract::rejection::JsonRejection;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// OpenAI's own model names, which front ends send without asking: each means the server's
/// current model.
const OPENAI_MODEL_NAMES: [&str; 3] = ["dall-e-2", "dall-e-3", "gpt-image-1"];

#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub n: Option<usize>,
    /// "WIDTHxHEIGHT" or "auto" (the model's native size).
    #[serde(default)]
    pub size: Option<String>,
    /// Only "b64_json".
    #[serde(default)]
    pub response_format: Option<String>,
    /// Not OpenAI's: a seed, for images that can be made again.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub output_format: Option<String>,
    /// quality, style, user, background, moderation, ...: accepted, no effect.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// "512x512" -> (512, 512); "auto" -> none.
fn parse_size(size: &str, max_side: usize) -> ApiResult<Option<(usize, usize)>> {
    if size == "auto" {
        return Ok(None);
    }
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    let Some((width, height)) = parsed else {
        return Err(ApiError::field(
            "size",
            format!("\"{size}\" is not a size; expected WIDTHxHEIGHT such as 512x512, or auto"),
        ));
    };
    for side in [width, height] {
        capped("size", side, max_side)?;
        if side % 8 != 0 {
            return Err(ApiError::field(
                "size",
                format!("{size}: sides must be multiples of 8"),
            ));
        }
    }
    Ok(Some((width, height)))
}

impl ImagesRequest {
    fn to_job(&self, state: &State) -> ApiResult<JobSpec> {
        let limits = &state.limits;
        let (prompt, loras) = prompt_and_loras(state, &self.prompt)?;
        let model = match self.model.as_deref() {
            None => state.store.current(),
            Some(name) if OPENAI_MODEL_NAMES.contains(&name) => state.store.current(),
            Some(name) => state
                .store
                .find_model(name)
                .map_err(|m| ApiError::field("model", m))?
                .name
                .clone(),
        };
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some(other) => {
                return Err(ApiError::field(
                    "response_format",
                    format!("\"{other}\" is not offered; this server answers b64_json only"),
                ))
            }
        }
        match self.output_format.as_deref() {
            None | Some("png") => {}
            Some(other) => {
                return Err(ApiError::field(
                    "output_format",
                    format!("\"{other}\" is not offered; this server writes png only"),
                ))
            }
        }
        let mut request = GenerationRequest::new(prompt);
        request.num_images = capped("n", self.n.unwrap_or(1), limits.max_images)?;
        if let Some((width, height)) =
            parse_size(self.size.as_deref().unwrap_or("auto"), limits.max_side)?
        {
            request.width = Some(width);
            request.height = Some(height);
        }
        request.seed = self.seed;
        Ok(JobSpec {
            model: ModelChoice { model, loras },
            request,
        })
    }
}

pub async fn generations(
    axum::extract::State(state): axum::extract::State<State>,
    body: Result<Json<ImagesRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let body = json_body(body)?;
    let spec = body.to_job(&state)?;
    let (job, status) = run_to_end(&state, spec).await?;
    let data: Vec<Value> = status
        .images
        .iter()
        .map(|image| {
            json!({
                "b64_json": base64_png(&image.png),
                "revised_prompt": null,
                "seed": image.seed,
            })
        })
        .collect();
    Ok(Json(json!({
        "created": unix_seconds(job.submitted),
        "data": data,
        "output_format": "png",
        "size": status.resolved.map(|r| format!("{}x{}", r.width, r.height)),
    })))
}

pub async fn models(axum::extract::State(state): axum::extract::State<State>) -> Json<Value> {
    let data: Vec<Value> = state
        .store
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "diffuse"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_width_by_height_within_the_cap() {
        assert_eq!(parse_size("512x256", 2048).unwrap(), Some((512, 256)));
        assert_eq!(parse_size("auto", 2048).unwrap(), None);
        for bad in ["512", "ax512", "4096x4096", "0x64", "65x64"] {
            let err = parse_size(bad, 2048).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("size"), "{bad}");
        }
    }
}
