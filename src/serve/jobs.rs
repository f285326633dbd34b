//! The job queue: requests wait in arrival order (FIFO) and a fixed number of worker threads
//! run them, one generation each at a time. Generation is blocking CPU (or GPU) work, so the
//! workers are plain threads; the HTTP side only enqueues, polls and waits on a watch channel.

use super::lock;
use super::models::{ModelChoice, ModelStore};
use crate::pipeline::request::GenerationRequest;
use candle_core::Tensor;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};
use tokio::sync::watch;

/// Finished jobs kept for polling (`GET /api/v1/jobs/{id}`) before the oldest are dropped.
const KEPT_FINISHED: usize = 64;

/// What a job asks for.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub model: ModelChoice,
    pub request: GenerationRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Queued,
    Loading,
    Running,
    Finished,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed | Phase::Cancelled)
    }
}

/// One generated picture, ready to send.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub prompt: String,
    pub seed: u64,
    /// A1111's `parameters` text (also inside the PNG).
    pub parameters: String,
}

/// Where a job is; read by progress requests while a worker writes it.
#[derive(Clone)]
pub struct JobStatus {
    pub phase: Phase,
    /// Sampler updates done of the current image batch, and how many it takes.
    pub step: usize,
    pub steps: usize,
    /// Image batches (prompts) done, and how many the job has.
    pub batches_done: usize,
    pub batches: usize,
    pub started: Option<Instant>,
    pub images: Vec<GeneratedImage>,
    pub error: Option<String>,
    /// The failure was the request's (a size or setting the model cannot take), not the
    /// server's.
    pub request_fault: bool,
    /// The model's name and the settings it resolved to, once running.
    pub model_name: Option<String>,
    pub resolved: Option<crate::pipeline::request::Resolved>,
    pub sampler_name: Option<String>,
    /// Notes for the client (a prompt the model has no word of, a truncated prompt).
    pub warnings: Vec<String>,
    /// The sampler's latest estimate of the clean latents, for a preview, and its step.
    pub preview_latents: Option<(usize, Tensor)>,
    pub preview_model: Option<Arc<super::models::LoadedModel>>,
}

impl JobStatus {
    /// The share of the job done, 0 to 1.
    pub fn fraction(&self) -> f64 {
        if self.phase == Phase::Finished {
            return 1.0;
        }
        if self.batches == 0 || self.steps == 0 {
            return 0.0;
        }
        (self.batches_done as f64 + self.step as f64 / self.steps as f64) / self.batches as f64
    }

    /// Seconds left at the pace so far, once there is a pace.
    pub fn eta_seconds(&self) -> Option<f64> {
        let started = self.started?;
        let fraction = self.fraction();
        if fraction <= 0.0 || self.phase.is_over() {
            return None;
        }
        let elapsed = started.elapsed().as_secs_f64();
        Some(elapsed * (1.0 - fraction) / fraction)
    }
}

pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    pub submitted: SystemTime,
    cancelled: AtomicBool,
    status: Mutex<JobStatus>,
    over: watch::Sender<bool>,
}

impl Job {
    fn new(id: u64, spec: JobSpec) -> Self {
        let batches = spec.request.prompts.len();
        Self {
            id,
            spec,
            submitted: SystemTime::now(),
            cancelled: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
                phase: Phase::Queued,
                step: 0,
                steps: 0,
                batches_done: 0,
                batches,
                started: None,
                images: Vec::new(),
                error: None,
                request_fault: false,
                model_name: None,
                resolved: None,
                sampler_name: None,
                warnings: Vec::new(),
                preview_latents: None,
                preview_model: None,
            }),
            over: watch::channel(false).0,
        }
    }

    pub fn status(&self) -> JobStatus {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, JobStatus> {
        // A worker that panicked mid-update leaves a status that is still worth reading.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the job to stop: a queued job never starts, a running one stops at its next step
    /// and keeps the images it finished.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until the job is over (finished, failed or cancelled).
    pub async fn wait(&self) {
        let mut over = self.over.subscribe();
        // The sender lives as long as the job, so this ends only when the job does.
        let _ = over.wait_for(|over| *over).await;
    }

    fn finish(&self, phase: Phase, error: Option<String>) {
        {
            let mut status = self.lock();
            status.phase = phase;
            status.error = error;
            status.preview_latents = None;
            status.preview_model = None;
        }
        self.over.send_replace(true);
    }
}

/// Cancels its job when dropped unless disarmed: a handler holds one while it waits, so a
/// client that goes away (and so drops the handler) frees the queue instead of leaving work
/// nobody will read.
pub struct CancelOnDrop(pub Option<Arc<Job>>);

impl CancelOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = &self.0 {
            job.cancel();
        }
    }
}

#[derive(Debug)]
pub struct QueueFull {
    pub capacity: usize,
}

pub struct JobQueue {
    waiting: Mutex<VecDeque<Arc<Job>>>,
    wake: Condvar,
    capacity: usize,
    next_id: AtomicU64,
    /// Every job not yet forgotten, by id: waiting, running and the latest finished.
    known: Mutex<HashMap<u64, Arc<Job>>>,
    running: Mutex<Vec<Arc<Job>>>,
    shutting_down: AtomicBool,
}

impl JobQueue {
    /// A queue that holds at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Self {
        Self {
            waiting: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity,
            next_id: AtomicU64::new(1),
            known: Mutex::new(HashMap::new()),
            running: Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Adds a job at the back of the queue, or refuses when the queue is full.
    pub fn submit(&self, spec: JobSpec) -> Result<Arc<Job>, QueueFull> {
        let mut waiting = lock(&self.waiting);
        if waiting.len() >= self.capacity {
            return Err(QueueFull {
                capacity: self.capacity,
            });
        }
        let job = Arc::new(Job::new(self.next_id.fetch_add(1, Ordering::SeqCst), spec));
        waiting.push_back(job.clone());
        lock(&self.known).insert(job.id, job.clone());
        drop(waiting);
        self.wake.notify_one();
        Ok(job)
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        lock(&self.known).get(&id).cloned()
    }

    pub fn waiting_len(&self) -> usize {
        lock(&self.waiting).len()
    }

    pub fn running(&self) -> Vec<Arc<Job>> {
        lock(&self.running).clone()
    }

    /// Cancels every running job (A1111's `interrupt`).
    pub fn interrupt_running(&self) -> usize {
        let running = self.running();
        for job in &running {
            job.cancel();
        }
        running.len()
    }

    /// Stops the workers once the jobs they hold are done; waiting jobs are cancelled.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let waiting: Vec<_> = lock(&self.waiting).drain(..).collect();
        for job in waiting {
            job.cancel();
            job.finish(Phase::Cancelled, Some("the server is shutting down".into()));
        }
        self.wake.notify_all();
    }

    /// The next job, waiting for one; None once the queue is shut down.
    fn next(&self) -> Option<Arc<Job>> {
        let mut waiting = lock(&self.waiting);
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(job) = waiting.pop_front() {
                return Some(job);
            }
            waiting = self.wake.wait(waiting).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Forgets the oldest finished jobs beyond [`KEPT_FINISHED`], so memory stays flat however
    /// many requests come.
    fn forget_old(&self) {
        let mut known = lock(&self.known);
        // Ids grow with submission, so the smallest are the oldest.
        let mut over: Vec<u64> = known
            .values()
            .filter(|job| job.lock().phase.is_over())
            .map(|job| job.id)
            .collect();
        if over.len() <= KEPT_FINISHED {
            return;
        }
        over.sort_unstable();
        for id in &over[..over.len() - KEPT_FINISHED] {
            known.remove(id);
        }
    }
}

/// Starts `count` worker threads that run the queue's jobs against `models`.
pub fn start_workers(
    queue: Arc<JobQueue>,
    models: Arc<ModelStore>,
    count: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..count)
        .map(|k| {
            let (queue, models) = (queue.clone(), models.clone());
            std::thread::Builder::new()
                .name(format!("generation-{k}"))
                .spawn(move || {
                    while let Some(job) = queue.next() {
                        lock(&queue.running).push(job.clone());
                        run_job(&job, &models);
                        lock(&queue.running).retain(|j| j.id != job.id);
                        queue.forget_old();
                    }
                })
                .expect("spawning a worker thread")
        })
        .collect()
}

const CANCELLED: &str = "cancelled";

/// A request the loaded model cannot serve as asked; its message names the setting (as the
/// API's field, not the command line's flag).
#[derive(Debug)]
struct RequestFault(String);

impl std::fmt::Display for RequestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RequestFault {}

/// Runs one job to its end, recording everything in its status; never panics out (a panic in
/// the model code fails the job, not the worker).
fn run_job(job: &Job, models: &ModelStore) {
    if job.is_cancelled() {
        job.finish(Phase::Cancelled, None);
        return;
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| generate(job, models)));
    match outcome {
        Ok(Ok(())) => job.finish(Phase::Finished, None),
        Ok(Err(_)) if job.is_cancelled() => job.finish(Phase::Cancelled, None),
        Ok(Err(e)) => {
            if let Some(fault) = e.downcast_ref::<RequestFault>() {
                job.lock().request_fault = true;
                job.finish(Phase::Failed, Some(fault.0.clone()));
            } else {
                job.finish(Phase::Failed, Some(format!("{e:#}")));
            }
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            job.finish(
                Phase::Failed,
                Some(format!("internal error (a panic): {message}")),
            );
        }
    }
}

fn generate(job: &Job, models: &ModelStore) -> anyhow::Result<()> {
    job.lock().phase = Phase::Loading;
    let model = models.get(&job.spec.model)?;
    let request = &job.spec.request;
    let generation = request
        .prepare(&model.sd, model.preset)
        .map_err(|e| RequestFault(e.to_string().replace("--", "")))?;
    {
        let mut status = job.lock();
        status.phase = Phase::Running;
        status.started = Some(Instant::now());
        status.steps = generation.steps_per_image();
        status.model_name = Some(model.name.clone());
        status.resolved = Some(generation.resolved);
        status.sampler_name = Some(generation.kind.a1111_name().to_string());
        status.preview_model = Some(model.clone());
        if let Some(concepts) = &model.concepts {
            for prompt in &request.prompts {
                if !concepts.knows(prompt) {
                    status.warnings.push(format!(
                        "no word of \"{prompt}\" names anything model {} was trained on; it \
                         draws one of its {} concepts instead",
                        model.name,
                        concepts.concepts.len()
                    ));
                }
            }
        }
    }
    for index in 0..request.prompts.len() {
        if job.is_cancelled() {
            anyhow::bail!(CANCELLED);
        }
        let mut on_step = |event: &crate::sampler::StepEvent| {
            let mut status = job.lock();
            status.step = event.index + 1;
            status.steps = status.steps.max(event.total);
            if let Some(x0) = event.pred_original {
                status.preview_latents = Some((event.index, x0.clone()));
            }
            drop(status);
            if job.is_cancelled() {
                candle_core::bail!("{CANCELLED}");
            }
            Ok(())
        };
        let out = generation.run(&model.sd, index, &mut on_step)?;
        let parameters = generation.parameters(index, &model.name);
        let mut images = Vec::new();
        for i in 0..out.images.dim(0)? {
            images.push(GeneratedImage {
                png: crate::image_io::encode_png(&out.images.get(i)?, Some(&parameters))?,
                prompt: request.prompts[index].clone(),
                seed: generation.seed(index),
                parameters: parameters.clone(),
            });
        }
        let mut status = job.lock();
        if out.prompt_truncated {
            status.warnings.push(format!(
                "prompt {} is longer than {} tokens and was truncated",
                index + 1,
                model.sd.tokenizer.max_length
            ));
        }
        status.images.extend(images);
        status.batches_done = index + 1;
        status.step = 0;
        status.preview_latents = None;
    }
    Ok(())
}
