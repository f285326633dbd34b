//! AUTOMATIC1111's web UI API (`/sdapi/v1/...`), the fields its clients send: each maps onto
//! the library's [`GenerationRequest`]; fields this server has no use for (`restore_faces`,
//! `alwayson_scripts`, ...) are accepted and ignored, as A1111 ignores settings it lacks.

use super::http::{
    base64_png, capped, compact_timestamp, decode_base64_image, json_body, prompt_and_loras,
    prompt_field, run_to_end, unix_seconds, ApiError, ApiResult,
};
use super::jobs::{JobSpec, JobStatus, Phase};
use super::models::ModelChoice;
use super::State;
use crate::pipeline::request::GenerationRequest;
use crate::sampler::SamplerKind;
use axum::extract::rejection::JsonRejection;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The body of `txt2img` and `img2img` (img2img adds the image fields).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct A1111Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// -1: a random seed.
    pub seed: Option<i64>,
    pub sampler_name: Option<String>,
    /// What clients before A1111 1.6 sent instead of `sampler_name`.
    pub sampler_index: Option<String>,
    /// "Automatic", "Uniform" or "Karras".
    pub scheduler: Option<String>,
    pub batch_size: Option<usize>,
    pub n_iter: Option<usize>,
    pub eta: Option<f64>,
    pub denoising_strength: Option<f64>,
    pub init_images: Vec<String>,
    /// White = repaint (unless `inpainting_mask_invert` is 1).
    pub mask: Option<String>,
    pub inpainting_mask_invert: Option<u8>,
    /// `sd_model_checkpoint` picks the model for this request; other settings are ignored.
    pub override_settings: serde_json::Map<String, Value>,
}

/// A1111's names for sigma spacing.
const SCHEDULERS: [(&str, &str); 3] = [
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
];

/// A sampler name as A1111 writes it ("Euler a", "DPM++ 2M Karras", or ours, "dpmpp-2m"),
/// with the scheduler field: the sampler and whether it takes Karras spacing.
pub fn parse_sampler(name: &str, scheduler: Option<&str>) -> ApiResult<(SamplerKind, bool)> {
    let (base, karras_suffix) = match name.strip_suffix(" Karras") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let kind = SamplerKind::from_a1111_name(base.trim()).ok_or_else(|| {
        ApiError::field(
            "sampler_name",
            format!(
                "\"{name}\" is not a sampler of this server; it has: {}",
                SamplerKind::ALL.map(|k| k.a1111_name()).join(", ")
            ),
        )
    })?;
    let karras = match scheduler.map(|s| s.trim().to_ascii_lowercase()) {
        None => karras_suffix,
        Some(s) if s == "automatic" => karras_suffix,
        Some(s) if s == "uniform" => false,
        Some(s) if s == "karras" => true,
        Some(other) => {
            return Err(ApiError::field(
                "scheduler",
                format!(
                    "\"{other}\" is not a scheduler of this server; it has: {}",
                    SCHEDULERS.map(|(_, label)| label).join(", ")
                ),
            ))
        }
    };
    if karras && !kind.uses_sigmas() {
        return Err(ApiError::field(
            "scheduler",
            format!(
                "Karras spacing needs a sampler that walks sigmas; {} does not",
                kind.a1111_name()
            ),
        ));
    }
    Ok((kind, karras))
}

impl A1111Request {
    /// The job this body asks for, every field checked against the server's caps.
    pub fn to_job(&self, state: &State, img2img: bool) -> ApiResult<JobSpec> {
        let limits = &state.limits;
        prompt_field(
            "negative_prompt",
            &self.negative_prompt,
            limits.max_prompt_chars,
        )?;
        let (prompt, loras) = prompt_and_loras(state, &self.prompt)?;
        let model = match self.override_settings.get("sd_model_checkpoint") {
            None => state.store.current(),
            Some(Value::String(name)) => state
                .store
                .find_model(name)
                .map_err(|m| ApiError::field("override_settings.sd_model_checkpoint", m))?
                .name
                .clone(),
            Some(other) => {
                return Err(ApiError::field(
                    "override_settings.sd_model_checkpoint",
                    format!("{other} is not a model name (a string)"),
                ))
            }
        };
        let batch_size = capped(
            "batch_size",
            self.batch_size.unwrap_or(1),
            limits.max_images,
        )?;
        let n_iter = capped("n_iter", self.n_iter.unwrap_or(1), limits.max_images)?;
        capped(
            "batch_size x n_iter",
            batch_size * n_iter,
            limits.max_images,
        )?;
        let mut request = GenerationRequest::new(prompt.clone());
        request.prompts = vec![prompt; n_iter];
        request.num_images = batch_size;
        request.negative = Some(self.negative_prompt.clone()).filter(|n| !n.is_empty());
        request.steps = self
            .steps
            .map(|s| capped("steps", s, limits.max_steps))
            .transpose()?;
        for (field, side) in [("width", self.width), ("height", self.height)] {
            if let Some(side) = side {
                capped(field, side, limits.max_side)?;
                if side % 8 != 0 {
                    return Err(ApiError::field(
                        field,
                        format!("{side} is not a multiple of 8"),
                    ));
                }
            }
        }
        request.width = self.width;
        request.height = self.height;
        if let Some(cfg) = self.cfg_scale {
            if !(0.0..=100.0).contains(&cfg) {
                return Err(ApiError::field(
                    "cfg_scale",
                    format!("{cfg} is not in 0 to 100"),
                ));
            }
            request.guidance = Some(cfg);
        }
        request.seed = match self.seed {
            None | Some(-1) => None,
            Some(seed) if seed >= 0 => Some(seed as u64),
            Some(seed) => {
                return Err(ApiError::field(
                    "seed",
                    format!("{seed} is not a seed; expected -1 (random) or a number >= 0"),
                ))
            }
        };
        let sampler_name = self.sampler_name.as_ref().or(self.sampler_index.as_ref());
        if let Some(name) = sampler_name {
            let (kind, karras) = parse_sampler(name, self.scheduler.as_deref())?;
            request.sampler = Some(kind);
            request.sampler_options.karras = karras;
        } else if let Some(scheduler) = &self.scheduler {
            parse_sampler("Euler", Some(scheduler))?;
        }
        if let Some(eta) = self.eta {
            if !(0.0..=1.0).contains(&eta) {
                return Err(ApiError::field("eta", format!("{eta} is not in 0 to 1")));
            }
            // A1111 clients send eta whatever the sampler (webuiapi always sends 1); as in
            // A1111, only a sampler that has an eta uses it.
            if request.sampler == Some(SamplerKind::Ddim) {
                request.sampler_options.eta = eta;
            }
        }
        if img2img {
            let Some(first) = self.init_images.first() else {
                return Err(ApiError::field(
                    "init_images",
                    "img2img needs one image (base64)",
                ));
            };
            request.init_image = Some(decode_base64_image("init_images[0]", first)?.to_rgb8());
            if let Some(mask) = &self.mask {
                let mut mask = decode_base64_image("mask", mask)?.to_luma8();
                if self.inpainting_mask_invert == Some(1) {
                    image::imageops::invert(&mut mask);
                }
                request.mask = Some(mask);
            }
            // Left out: the library's default strength.
            let strength = self.denoising_strength.unwrap_or(request.strength);
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(ApiError::field(
                    "denoising_strength",
                    format!("{strength} is not in (0, 1]"),
                ));
            }
            request.strength = strength;
        }
        Ok(JobSpec {
            model: ModelChoice { model, loras },
            request,
        })
    }
}

/// A1111's response to a generation: the images, the request as it came, and `info`, a JSON
/// string of what was made (seeds, settings, one `infotexts` entry an image).
fn generation_response(body: &A1111Request, job_id: u64, status: &JobStatus) -> Value {
    let images: Vec<String> = status.images.iter().map(|i| base64_png(&i.png)).collect();
    let resolved = status.resolved;
    let seeds: Vec<u64> = status.images.iter().map(|i| i.seed).collect();
    let info = json!({
        "prompt": status.images.first().map(|i| i.prompt.clone()).unwrap_or_else(|| body.prompt.clone()),
        "all_prompts": status.images.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>(),
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": status.images.iter().map(|_| body.negative_prompt.clone()).collect::<Vec<_>>(),
        "seed": seeds.first().copied().or(resolved.map(|r| r.seed)),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": status.images.iter().map(|_| -1).collect::<Vec<_>>(),
        "subseed_strength": 0,
        "width": resolved.map(|r| r.width),
        "height": resolved.map(|r| r.height),
        "sampler_name": status.sampler_name,
        "cfg_scale": resolved.map(|r| r.guidance),
        "steps": resolved.map(|r| r.steps),
        "batch_size": body.batch_size.unwrap_or(1),
        "n_iter": body.n_iter.unwrap_or(1),
        "denoising_strength": body.denoising_strength,
        "sd_model_name": status.model_name,
        "sd_model_hash": null,
        "job_timestamp": compact_timestamp(unix_seconds(std::time::SystemTime::now())),
        "infotexts": status.images.iter().map(|i| i.parameters.clone()).collect::<Vec<_>>(),
        "styles": [],
        "clip_skip": 1,
        "version": concat!("diffuse ", env!("CARGO_PKG_VERSION")),
        "interrupted": status.phase == Phase::Cancelled,
        "warnings": status.warnings,
        "job_id": job_id,
    });
    json!({
        "images": images,
        "parameters": body,
        "info": info.to_string(),
    })
}

async fn generate(
    state: State,
    body: Result<Json<A1111Request>, JsonRejection>,
    img2img: bool,
) -> ApiResult<Json<Value>> {
    let body = json_body(body)?;
    let spec = body.to_job(&state, img2img)?;
    let (job, status) = run_to_end(&state, spec).await?;
    Ok(Json(generation_response(&body, job.id, &status)))
}

pub async fn txt2img(
    axum::extract::State(state): axum::extract::State<State>,
    body: Result<Json<A1111Request>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    generate(state, body, false).await
}

pub async fn img2img(
    axum::extract::State(state): axum::extract::State<State>,
    body: Result<Json<A1111Request>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    generate(state, body, true).await
}

#[derive(Debug, Deserialize)]
pub struct ProgressQuery {
    #[serde(default)]
    pub skip_current_image: bool,
}

/// The running job's progress (the first, when several workers run), with a preview of its
/// current estimate of the picture unless `skip_current_image`.
pub async fn progress(
    axum::extract::State(state): axum::extract::State<State>,
    query: Result<Query<ProgressQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let skip_image = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?
        .skip_current_image;
    let running = state.queue.running();
    let job_count = running.len() + state.queue.waiting_len();
    let Some(job) = running.first() else {
        return Ok(Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": job_count,
                      "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
            "current_image": null,
            "textinfo": null,
            "current_task": null,
        })));
    };
    let status = job.status();
    let current_image = match skip_image {
        true => None,
        false => preview(&state, job.id, &status).await,
    };
    Ok(Json(json!({
        "progress": status.fraction(),
        "eta_relative": status.eta_seconds().unwrap_or(0.0),
        "state": {
            "skipped": false,
            "interrupted": job.is_cancelled(),
            "job": format!("job {}", job.id),
            "job_count": job_count,
            "job_timestamp": compact_timestamp(unix_seconds(job.submitted)),
            "job_no": status.batches_done,
            "sampling_step": status.step,
            "sampling_steps": status.steps,
        },
        "current_image": current_image,
        "textinfo": null,
        "current_task": format!("job {}", job.id),
    })))
}

/// A base64 PNG of the job's current estimate of its first image, decoded by the model's VAE
/// off the async threads; one decode a step, however many clients poll.
pub async fn preview(state: &State, job_id: u64, status: &JobStatus) -> Option<String> {
    let (step, latents) = status.preview_latents.clone()?;
    let model = status.preview_model.clone()?;
    if let Some((id, cached_step, png)) = &*super::lock(&state.preview_cache) {
        if *id == job_id && *cached_step == step {
            return Some(png.clone());
        }
    }
    let png = tokio::task::spawn_blocking(move || -> crate::Result<Vec<u8>> {
        let first = latents.narrow(0, 0, 1)?;
        let image = model.sd.decode_preview(&first)?.get(0)?;
        crate::image_io::encode_png(&image, None)
    })
    .await
    .ok()?
    .ok()?;
    let encoded = base64_png(&png);
    *super::lock(&state.preview_cache) = Some((job_id, step, encoded.clone()));
    Some(encoded)
}

pub async fn interrupt(axum::extract::State(state): axum::extract::State<State>) -> Json<Value> {
    let stopped = state.queue.interrupt_running();
    Json(json!({ "interrupted": stopped }))
}

pub async fn sd_models(axum::extract::State(state): axum::extract::State<State>) -> Json<Value> {
    Json(Value::Array(
        state
            .store
            .models
            .iter()
            .map(|m| {
                json!({"title": m.name, "model_name": m.name, "hash": null, "sha256": null,
                       "filename": m.spec, "config": null})
            })
            .collect(),
    ))
}

pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SamplerKind::ALL
            .iter()
            .map(|k| {
                json!({"name": k.a1111_name(), "aliases": [k.cli_name()],
                       "options": {"uses_sigmas": k.uses_sigmas()}})
            })
            .collect(),
    ))
}

pub async fn schedulers() -> Json<Value> {
    Json(Value::Array(
        SCHEDULERS
            .iter()
            .map(|(name, label)| {
                json!({"name": name, "label": label, "aliases": null, "default_rho": null,
                       "need_inner_model": false})
            })
            .collect(),
    ))
}

pub async fn loras(axum::extract::State(state): axum::extract::State<State>) -> Json<Value> {
    Json(Value::Array(
        state
            .store
            .loras
            .iter()
            .map(|l| json!({"name": l.name, "alias": l.name, "path": l.path, "metadata": {}}))
            .collect(),
    ))
}

pub async fn get_options(axum::extract::State(state): axum::extract::State<State>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": state.store.current(),
        "sd_checkpoint_hash": null,
        "samples_format": "png",
    }))
}

/// `sd_model_checkpoint` switches the model requests get by default, loading it before the
/// answer as A1111 does; other options are accepted and ignored.
pub async fn set_options(
    axum::extract::State(state): axum::extract::State<State>,
    body: Result<Json<serde_json::Map<String, Value>>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let body = json_body(body)?;
    let Some(name) = body.get("sd_model_checkpoint") else {
        return Ok(Json(Value::Null));
    };
    let Value::String(name) = name else {
        return Err(ApiError::field(
            "sd_model_checkpoint",
            format!("{name} is not a model name (a string)"),
        ));
    };
    let name = state
        .store
        .set_current(name)
        .map_err(|m| ApiError::field("sd_model_checkpoint", m))?;
    let store = state.store.clone();
    let choice = ModelChoice {
        model: name,
        loras: Vec::new(),
    };
    tokio::task::spawn_blocking(move || store.get(&choice).map(|_| ()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok(Json(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_sampler_names_map_onto_ours() {
        assert_eq!(
            parse_sampler("Euler a", None).unwrap(),
            (SamplerKind::EulerAncestral, false)
        );
        assert_eq!(
            parse_sampler("DPM++ 2M Karras", None).unwrap(),
            (SamplerKind::DpmPp2m, true)
        );
        assert_eq!(
            parse_sampler("DPM++ 2M", Some("Karras")).unwrap(),
            (SamplerKind::DpmPp2m, true)
        );
        assert_eq!(
            parse_sampler("DDIM", Some("Automatic")).unwrap(),
            (SamplerKind::Ddim, false)
        );
        assert_eq!(
            parse_sampler("dpmpp-2m", None).unwrap().0,
            SamplerKind::DpmPp2m
        );
        let err = parse_sampler("DPM++ SDE", None).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("sampler_name"));
        assert!(err.message.contains("Euler a"), "{}", err.message);
        assert_eq!(
            parse_sampler("DDIM", Some("Karras"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("scheduler")
        );
        assert_eq!(
            parse_sampler("Euler", Some("Exponential"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("scheduler")
        );
    }
}
