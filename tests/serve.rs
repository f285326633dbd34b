//! `diffuse serve` over real HTTP: the binary on an ephemeral port, with the tiny SD fixture
//! and the embedded model. What a client gets equals what `txt2img` writes; bad requests get
//! errors naming the field and never take the server down; a full queue answers 503 and loses
//! nothing; a client that goes away frees the queue; memory stays flat.

mod common;

use base64::Engine;
use candle_core::{Device, Tensor};
use common::{assert_success, fixture_path};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// (status, JSON body, Retry-After) of a call; errors are answers too.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value, Option<String>) {
        self.call_with(method, path, body, None)
    }

    fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(600))
            .build();
        let mut request = agent.request(method, &self.url(path));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let result = match body {
            Some(body) => request.send_json(body.clone()),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let retry = response.header("retry-after").map(str::to_string);
        let text = response.into_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value, retry)
    }

    /// Sends raw bytes as a request body (for what a JSON library would not send).
    fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let response = ureq::post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_bytes(body);
        let response = match response {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn png_pixels(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let image = image::load_from_memory(png).unwrap().to_rgb8();
    (image.width(), image.height(), image.into_raw())
}

fn b64_pixels(text: &Value) -> (u32, u32, Vec<u8>) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .unwrap();
    png_pixels(&bytes)
}

fn cli_pixels(dir: &Path, name: &str, args: &[&str]) -> (u32, u32, Vec<u8>) {
    let output = dir.join(format!("{name}.png"));
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("txt2img")
        .args(args)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert_success(&out);
    png_pixels(&std::fs::read(output).unwrap())
}

/// A kohya-layout LoRA on the tiny U-Net's first attention's query projection, big enough to
/// change the picture.
fn write_lora(path: &Path) {
    let weights = fixture_path("tiny-sd")
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let shapes = diffuse::weights::tensor_shapes(&weights).unwrap();
    let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let shape = &shapes[&format!("{module}.weight")];
    let rank = 2;
    let down = Tensor::ones((rank, shape[1]), candle_core::DType::F32, &Device::Cpu).unwrap();
    let up = Tensor::ones((shape[0], rank), candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap();
    let key = format!("lora_unet_{}", module.replace('.', "_"));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (format!("{key}.lora_down.weight"), down),
            (format!("{key}.lora_up.weight"), up),
        ]),
        path,
    )
    .unwrap();
}

#[test]
fn a1111_and_openai_answers_equal_what_txt2img_writes() {
    let dir = temp_dir("parity");
    let loras = dir.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    write_lora(&loras.join("style.safetensors"));
    let model = fixture_path("tiny-sd");
    let model = model.to_str().unwrap();
    let server = Server::start(&["--model", model, "--lora-dir", loras.to_str().unwrap()]);
    let base_args = [
        "--model", model, "--steps", "3", "--seed", "11", "--width", "32", "--height", "32",
    ];
    let body =
        json!({"prompt": "a photo of a cat", "steps": 3, "seed": 11, "width": 32, "height": 32});
    let (status, answer, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let served = b64_pixels(&answer["images"][0]);
    let written = cli_pixels(
        &dir,
        "plain",
        &[&base_args[..], &["a photo of a cat"]].concat(),
    );
    assert_eq!(served, written, "the server's image differs from txt2img's");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([11]));
    assert_eq!(info["prompt"], "a photo of a cat");
    assert!(info["infotexts"][0].as_str().unwrap().contains("Seed: 11"));

    // A1111's sampler names and LoRA tags reach the same settings as the flags.
    let body = json!({"prompt": "a photo of a cat <lora:style:0.7>", "steps": 3, "seed": 11,
                      "width": 32, "height": 32, "sampler_name": "Euler a"});
    let (status, answer, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let lora_path = format!("{}:0.7", loras.join("style.safetensors").display());
    let written = cli_pixels(
        &dir,
        "lora",
        &[
            &base_args[..],
            &[
                "--sampler",
                "euler-a",
                "--lora",
                &lora_path,
                "a photo of a cat",
            ],
        ]
        .concat(),
    );
    assert_eq!(b64_pixels(&answer["images"][0]), written);
    let no_lora = cli_pixels(
        &dir,
        "euler-a",
        &[
            &base_args[..],
            &["--sampler", "euler-a", "a photo of a cat"],
        ]
        .concat(),
    );
    assert_ne!(written, no_lora, "the LoRA should change the picture");

    // OpenAI's images API: n images of the size asked, the first the same as txt2img's.
    let body = json!({"model": "tiny-sd", "prompt": "a photo of a cat", "n": 2, "size": "32x32", "seed": 11});
    let (status, answer, _) = server.call("POST", "/v1/images/generations", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let (w, h, _) = b64_pixels(&data[1]["b64_json"]);
    assert_eq!((w, h), (32, 32));
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args([
            "txt2img", "--model", model, "--seed", "11", "--width", "32", "--height", "32",
        ])
        .args(["--num-images", "2", "--output"])
        .arg(dir.join("two.png"))
        .arg("a photo of a cat")
        .output()
        .unwrap();
    assert_success(&out);
    for (k, image) in data.iter().enumerate() {
        let written = png_pixels(&std::fs::read(dir.join(format!("two-{}.png", k + 1))).unwrap());
        assert_eq!(b64_pixels(&image["b64_json"]), written, "image {k}");
    }
    let (_, models, _) = server.call("GET", "/v1/models", None);
    assert_eq!(models["data"][0]["id"], "tiny-sd");
    let (_, listed, _) = server.call("GET", "/sdapi/v1/loras", None);
    assert_eq!(listed[0]["name"], "style");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hostile_requests_get_errors_naming_the_field_and_the_server_stays_up() {
    let server = Server::start(&["--max-body-mib", "1"]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("truncated", br#"{"prompt": "a cat", "steps"#.to_vec(), 400, "JSON"),
        ("not JSON", b"prompt=a cat".to_vec(), 400, "JSON"),
        ("wrong type", br#"{"prompt": "a cat", "steps": "many"}"#.to_vec(), 422, "steps"),
        ("negative size", br#"{"prompt": "a cat", "width": -64}"#.to_vec(), 422, "width"),
        ("huge number", br#"{"prompt": "a cat", "height": 1e300}"#.to_vec(), 422, "height"),
        ("over the cap", br#"{"prompt": "a cat", "width": 65536}"#.to_vec(), 422, "width"),
        ("too many steps", br#"{"prompt": "a cat", "steps": 100000}"#.to_vec(), 422, "steps"),
        ("too many images", br#"{"prompt": "a cat", "batch_size": 8, "n_iter": 8}"#.to_vec(), 422, "batch_size x n_iter"),
        ("odd size", br#"{"prompt": "a cat", "width": 30}"#.to_vec(), 422, "width"),
        ("empty prompt", br#"{"prompt": "  "}"#.to_vec(), 422, "prompt"),
        ("bad seed", br#"{"prompt": "a cat", "seed": -7}"#.to_vec(), 422, "seed"),
        ("bad sampler", br#"{"prompt": "a cat", "sampler_name": "DPM++ SDE"}"#.to_vec(), 422, "sampler_name"),
        ("bad scheduler", br#"{"prompt": "a cat", "scheduler": "Polyexponential"}"#.to_vec(), 422, "scheduler"),
        ("model traversal", br#"{"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}"#.to_vec(), 422, "sd_model_checkpoint"),
        ("lora traversal", br#"{"prompt": "a cat <lora:../../../etc/passwd:1>"}"#.to_vec(), 422, "prompt"),
        ("unclosed lora", br#"{"prompt": "a cat <lora:x"}"#.to_vec(), 422, "prompt"),
        ("out-of-range number", br#"{"prompt": "a cat", "cfg_scale": 1e999}"#.to_vec(), 400, "cfg_scale"),
        ("guidance out of range", br#"{"prompt": "a cat", "cfg_scale": -3}"#.to_vec(), 422, "cfg_scale"),
        ("long prompt", format!(r#"{{"prompt": "{}"}}"#, "cat ".repeat(2000)).into_bytes(), 422, "prompt"),
    ];
    for (name, body, status, needle) in &cases {
        let (got, answer) = server.post_raw("/sdapi/v1/txt2img", body);
        assert_eq!(got, *status, "{name}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(answer["detail"].as_str(), Some(message), "{name}");
    }
    // An oversized body is refused on its declared length, before it is read (a client still
    // writing it may see the connection close instead of the answer, so none is sent here).
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 << 20
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("over this server's limit"), "{answer}");
    let img2img: Vec<(&str, Value, &str)> = vec![
        ("no image", json!({"prompt": "a cat"}), "init_images"),
        (
            "base64 garbage",
            json!({"prompt": "a cat", "init_images": ["%%%not base64"]}),
            "init_images[0]",
        ),
        (
            "not an image",
            json!({"prompt": "a cat", "init_images": ["aGVsbG8gd29ybGQ="]}),
            "init_images[0]",
        ),
        (
            "bad mask",
            json!({"prompt": "a cat", "init_images": [tiny_png()], "mask": "AAAA"}),
            "mask",
        ),
        (
            "bad strength",
            json!({"prompt": "a cat", "init_images": [tiny_png()], "denoising_strength": 2.0}),
            "denoising_strength",
        ),
    ];
    for (name, body, needle) in &img2img {
        let (status, answer, _) = server.call("POST", "/sdapi/v1/img2img", Some(body));
        assert_eq!(status, 422, "{name}: {answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains(needle),
            "{name}: {answer}"
        );
    }
    let openai: Vec<(&str, Value, &str)> = vec![
        (
            "bad size",
            json!({"prompt": "a cat", "size": "big"}),
            "size",
        ),
        (
            "url format",
            json!({"prompt": "a cat", "response_format": "url"}),
            "response_format",
        ),
        (
            "unknown model",
            json!({"prompt": "a cat", "model": "../weights"}),
            "model",
        ),
        ("too many", json!({"prompt": "a cat", "n": 1000}), "n"),
    ];
    for (name, body, needle) in &openai {
        let (status, answer, _) = server.call("POST", "/v1/images/generations", Some(body));
        assert_eq!(status, 422, "{name}: {answer}");
        assert_eq!(answer["error"]["param"], *needle, "{name}: {answer}");
    }
    // Byte-level mutations of valid bodies: every answer is an answer (no panic, no dropped
    // connection), and only whole, valid requests generate.
    let seeds = [
        json!({"prompt": "a photo of a bag", "steps": 2, "seed": 1, "width": 32, "height": 32, "sampler_name": "Euler a", "batch_size": 1}).to_string(),
        json!({"prompt": "a cat <lora:x:0.5>", "init_images": [tiny_png()], "mask": tiny_png(), "denoising_strength": 0.5}).to_string(),
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..150 {
        let mut body = seeds[round % seeds.len()].as_bytes().to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % body.len();
            match next() % 3 {
                0 => body[at] = (next() % 256) as u8,
                1 => body.truncate(at),
                _ => {
                    let bytes = b"{}[]\",:-9e\0";
                    body.insert(at, bytes[(next() as usize) % bytes.len()])
                }
            }
            if body.is_empty() {
                body.push(b'{');
            }
        }
        let path = ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/v1/jobs"][round % 3];
        let (status, answer) = server.post_raw(path, &body);
        assert!(
            [200, 202, 400, 413, 415, 422].contains(&status),
            "{path} {}: {status} {answer}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            assert!(answer["detail"].is_string(), "{answer}");
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    eprintln!("mutated bodies, answers by status: {statuses:?}");
    let (status, _, _) = server.call("GET", "/api/v1/jobs/999999", None);
    assert_eq!(status, 404);
    let (status, _, _) = server.call("GET", "/sdapi/v1/nothing-here", None);
    assert_eq!(status, 404);
    let (status, answer, _) =
        server.call("GET", "/sdapi/v1/progress?skip_current_image=maybe", None);
    assert_eq!(status, 400, "{answer}");
    // Still serving, and `info` says what the model could not know.
    let body = json!({"prompt": "a handwritten digit three", "seed": 5, "steps": 4});
    let (status, answer, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let body = json!({"prompt": "a zeppelin over paris", "seed": 5, "steps": 2});
    let (_, answer, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert!(
        info["warnings"][0].as_str().unwrap().contains("zeppelin"),
        "{info}"
    );
}

fn tiny_png() -> String {
    let image = image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[test]
fn concurrent_clients_get_their_own_images_or_503_and_none_is_lost() {
    let server = Server::start(&["--queue-size", "2"]);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for client in 0..8u64 {
            let (server, results) = (&server, &results);
            scope.spawn(move || {
                for k in 0..4u64 {
                    let seed = 1000 + client * 10 + k;
                    let prompt = format!(
                        "a handwritten digit {}",
                        ["one", "two", "three", "four"][k as usize]
                    );
                    let body = json!({"prompt": prompt, "seed": seed, "steps": 12});
                    let (status, answer, retry) =
                        server.call("POST", "/sdapi/v1/txt2img", Some(&body));
                    results
                        .lock()
                        .unwrap()
                        .push((seed, prompt, status, answer, retry));
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    assert_eq!(results.len(), 32);
    let mut served = 0;
    for (seed, prompt, status, answer, retry) in &results {
        match status {
            200 => {
                served += 1;
                let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
                assert_eq!(info["all_seeds"], json!([seed]), "{info}");
                assert_eq!(info["prompt"].as_str(), Some(prompt.as_str()));
                assert_eq!(answer["images"].as_array().unwrap().len(), 1);
            }
            503 => assert!(retry.is_some(), "a 503 without Retry-After"),
            other => panic!("status {other}: {answer}"),
        }
    }
    assert!(served >= 3, "only {served} of 32 served");
    eprintln!("served {served} of 32, the rest 503");
}

#[test]
fn a_client_that_leaves_frees_the_queue_and_jobs_can_be_cancelled() {
    let server = Server::start(&[]);
    // A long job, sent by hand and abandoned once it runs.
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let body = json!({"prompt": "a photo of a sneaker", "steps": 150, "width": 256, "height": 256, "seed": 1}).to_string();
    write!(
        stream,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let started = wait_for(&server, |p| p["state"]["sampling_step"].as_u64() >= Some(1));
    assert!(started, "the job never started");
    drop(stream);
    // The job is cancelled, and the next request is served.
    assert!(
        wait_for(&server, |p| p["state"]["job_count"] == 0),
        "the abandoned job still runs"
    );
    let (_, job, _) = server.call("GET", "/api/v1/jobs/1", None);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(job["step"].as_u64().unwrap() < 150);
    let body = json!({"prompt": "a handwritten digit two", "seed": 2, "steps": 3});
    let (status, _, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    assert_eq!(status, 200);

    // The page's job API: progress with a preview, then cancel.
    let body = json!({"prompt": "a photo of a bag", "steps": 150, "width": 256, "height": 256});
    let (status, answer, _) = server.call("POST", "/api/v1/jobs", Some(&body));
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_u64().unwrap();
    let path = format!("/api/v1/jobs/{id}");
    let mut seen_preview = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let (_, job, _) = server.call("GET", &path, None);
        if job["state"] == "running" && job["preview"].is_string() {
            let (w, _, _) = b64_pixels(&job["preview"]);
            assert_eq!(w, 256);
            assert!(job["progress"].as_f64().unwrap() > 0.0);
            seen_preview = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_preview, "no preview while running");
    let (status, _, _) = server.call("DELETE", &path, None);
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut state = Value::Null;
    while Instant::now() < deadline {
        state = server.call("GET", &path, None).1["state"].clone();
        if state == "cancelled" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state, "cancelled");

    // A1111's interrupt stops the running job; its answer says so.
    let body = json!({"prompt": "a photo of a coat", "steps": 150, "width": 256, "height": 256});
    let waiter = {
        let url = server.url("/sdapi/v1/txt2img");
        std::thread::spawn(move || {
            ureq::post(&url)
                .send_json(body)
                .unwrap()
                .into_json::<Value>()
                .unwrap()
        })
    };
    assert!(wait_for(&server, |p| p["state"]["sampling_step"].as_u64() >= Some(1)));
    let (status, answer, _) = server.call("POST", "/sdapi/v1/interrupt", None);
    assert_eq!((status, answer["interrupted"].as_u64()), (200, Some(1)));
    let answer = waiter.join().unwrap();
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
}

/// Polls A1111's progress until `done` holds (true) or a minute passes (false).
fn wait_for(server: &Server, done: impl Fn(&Value) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let (_, progress, _) =
            server.call("GET", "/sdapi/v1/progress?skip_current_image=true", None);
        if done(&progress) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_key_guards_the_api_and_is_needed_beyond_loopback() {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("DIFFUSE_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key") && err.contains("--no-auth"),
        "{err}"
    );

    let server = Server::start(&["--api-key", "s3cret"]);
    let (status, answer, _) = server.call("GET", "/sdapi/v1/sd-models", None);
    assert_eq!(status, 401, "{answer}");
    let (status, _, _) = server.call_with("GET", "/sdapi/v1/sd-models", None, Some("wrong"));
    assert_eq!(status, 401);
    let (status, _, _) = server.call_with("GET", "/v1/models", None, Some("s3cret"));
    assert_eq!(status, 200);
    let body = json!({"prompt": "a cat"});
    let (status, _, _) = server.call("POST", "/v1/images/generations", Some(&body));
    assert_eq!(status, 401);
    // CORS is off unless asked for.
    let origin_header = |server: &Server| {
        ureq::get(&server.url("/v1/models"))
            .set("Origin", "http://example.test")
            .set("Authorization", "Bearer s3cret")
            .call()
            .unwrap()
            .header("access-control-allow-origin")
            .map(str::to_string)
    };
    assert_eq!(origin_header(&server), None);
    let open = Server::start(&[
        "--api-key",
        "s3cret",
        "--cors-origin",
        "http://example.test",
    ]);
    assert_eq!(origin_header(&open).as_deref(), Some("http://example.test"));
    // The page itself loads; it asks for the key when the API refuses.
    let page = ureq::get(&server.url("/"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("id=\"generate\"") && page.contains("api-key"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page must need no network"
    );
}

#[test]
fn models_switch_by_options_and_memory_stays_flat() {
    let dir = temp_dir("models");
    for name in ["tiny-sd", "tiny-sdxl"] {
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(fixture_path(name), link).unwrap();
        }
    }
    let server = Server::start(&["--models-dir", dir.to_str().unwrap()]);
    let (_, models, _) = server.call("GET", "/sdapi/v1/sd-models", None);
    let names: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "embedded");
    assert!(
        names.contains(&"tiny-sd") && names.contains(&"tiny-sdxl"),
        "{names:?}"
    );
    let (status, _, _) = server.call(
        "POST",
        "/sdapi/v1/options",
        Some(&json!({"sd_model_checkpoint": "tiny-sd"})),
    );
    assert_eq!(status, 200);
    let (_, options, _) = server.call("GET", "/sdapi/v1/options", None);
    assert_eq!(options["sd_model_checkpoint"], "tiny-sd");
    let body = json!({"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": 1});
    let (_, answer, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "tiny-sd");
    let (status, _, _) = server.call(
        "POST",
        "/sdapi/v1/options",
        Some(&json!({"sd_model_checkpoint": "embedded"})),
    );
    assert_eq!(status, 200);

    // Resident memory after 20 requests and after 200 more: generation buffers and finished
    // jobs must not pile up.
    let body = json!({"prompt": "a photo of a shirt", "steps": 2, "seed": 3});
    let run = |count: usize| {
        for _ in 0..count {
            let (status, _, _) = server.call("POST", "/sdapi/v1/txt2img", Some(&body));
            assert_eq!(status, 200);
        }
    };
    run(20);
    let before = resident_kib(server.pid());
    run(200);
    let after = resident_kib(server.pid());
    eprintln!("resident memory: {before} KiB after 20 requests, {after} KiB after 220");
    assert!(
        after < before + 20 * 1024,
        "resident memory grew from {before} KiB to {after} KiB over 200 requests"
    );
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
