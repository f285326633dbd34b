//! The CLIP BPE tokenizer as Stable Diffusion feeds it: bos + tokens + eos, truncated to the
//! model's 77 positions and padded with the folder's pad token (`<|endoftext|>` in SD 1.x, `!`
//! in SD 2.x).

use crate::error::{file_error, Error, Result};
use std::path::Path;

#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pub max_length: usize,
    pub pad_id: u32,
    pub eos_id: u32,
}

/// The ids of one prompt, padded to `max_length`.
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Tokens (with bos/eos) before truncation; more than `max_length` means some were dropped.
    pub untruncated_len: usize,
}

/// The CLIP tokenizer from the slow format (`vocab.json` + `merges.txt`, what SD 1.x/2.x repos
/// ship): the BPE model with CLIP's normaliser (NFC, whitespace runs to one space, lower case),
/// its word-splitting pattern, byte-level encoding, `</w>` word ends, and bos/eos added.
fn from_vocab_and_merges(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    for path in [&vocab_path, &merges_path] {
        if !path.exists() {
            return Err(file_error(
                path,
                "missing: the tokenizer folder needs tokenizer.json, or vocab.json and merges.txt",
            ));
        }
    }
    let read =
        |path: &Path| std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()));
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&read(&vocab_path)?)
            .map_err(|e| file_error(&vocab_path, format!("not a JSON object of token ids: {e}")))?;
    let merges_text = read(&merges_path)?;
    let merges: Vec<&str> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let id = |token: &str| -> Result<u64> {
        vocab
            .get(token)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| file_error(&vocab_path, format!("has no {token}")))
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
            {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    spec.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| file_error(&merges_path, format!("cannot build the BPE tokenizer: {e}")))
}

/// A special token as `special_tokens_map.json` writes it: a string or `{"content": ...}`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    value
        .as_str()
        .map(str::to_string)
        .or_else(|| value.get("content")?.as_str().map(str::to_string))
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` from a diffusers `tokenizer/` folder, and the pad token and
    /// maximum length from its `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.exists() {
            let text = std::fs::read_to_string(&json)
                .map_err(|e| file_error(&json, format!("cannot be read: {e}")))?;
            // tokenizers panics (rather than erring) when the JSON breaks off inside its
            // `decoder` entry, so the syntax is checked here first.
            serde_json::from_str::<serde::de::IgnoredAny>(&text)
                .map_err(|e| file_error(&json, format!("not valid JSON: {e}")))?;
            text.parse::<tokenizers::Tokenizer>()
                .map_err(|e| file_error(&json, format!("not a valid tokenizer: {e}")))?
        } else {
            from_vocab_and_merges(dir)?
        };
        let mut settings = serde_json::Map::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| file_error(&path, format!("not valid JSON: {e}")))?;
                if let Some(map) = value.as_object() {
                    settings.extend(map.clone());
                }
            }
        }
        let token_id = |key: &str, default: &str| -> Result<u32> {
            let text = settings
                .get(key)
                .and_then(token_text)
                .unwrap_or_else(|| default.to_string());
            tokenizer.token_to_id(&text).ok_or_else(|| {
                file_error(&json, format!("{key} {text:?} is not in the vocabulary"))
            })
        };
        let max_length = settings
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|n| *n >= 2 && *n <= 4096)
            .unwrap_or(77) as usize;
        Ok(Self {
            pad_id: token_id("pad_token", "<|endoftext|>")?,
            eos_id: token_id("eos_token", "<|endoftext|>")?,
            tokenizer,
            max_length,
        })
    }

    /// This tokenizer padded with `pad`, which becomes a special token (as in the tokenizers of
    /// SD 2.x and SDXL's second encoder, padded with "!": a literal "!" in a prompt then
    /// encodes to the pad id, as there).
    pub fn padded_with(mut self, pad: &str) -> Result<Self> {
        self.tokenizer
            .add_special_tokens([tokenizers::AddedToken::from(pad.to_string(), true)])
            .map_err(|e| Error::Msg(format!("cannot add the pad token {pad:?}: {e}")))?;
        self.pad_id = self
            .tokenizer
            .token_to_id(pad)
            .ok_or_else(|| Error::Msg(format!("the pad token {pad:?} is not in the vocabulary")))?;
        Ok(self)
    }

    /// Writes this tokenizer as a diffusers `tokenizer/` folder (`tokenizer.json`, its pad and
    /// end tokens in `special_tokens_map.json`, the length in `tokenizer_config.json`).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e.to_string()))?;
        let json = dir.join("tokenizer.json");
        self.tokenizer
            .save(&json, false)
            .map_err(|e| file_error(&json, format!("cannot be written: {e}")))?;
        let token = |id: u32| {
            self.tokenizer
                .id_to_token(id)
                .ok_or_else(|| Error::Msg(format!("token id {id} is not in the vocabulary")))
        };
        let files = [
            (
                "special_tokens_map.json",
                serde_json::json!({
                    "bos_token": "<|startoftext|>",
                    "eos_token": token(self.eos_id)?,
                    "pad_token": token(self.pad_id)?,
                    "unk_token": "<|endoftext|>",
                }),
            ),
            (
                "tokenizer_config.json",
                serde_json::json!({ "model_max_length": self.max_length }),
            ),
        ];
        for (name, value) in files {
            let path = dir.join(name);
            std::fs::write(&path, format!("{value:#}\n"))
                .map_err(|e| file_error(&path, format!("cannot be written: {e}")))?;
        }
        Ok(())
    }

    /// bos + BPE tokens + eos, without padding (what `tokenizer(text).input_ids` gives).
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Msg(format!("cannot tokenize {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Truncated to `max_length` (keeping the final eos) and padded with `pad_id`.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let mut ids = self.encode_unpadded(text)?;
        let untruncated_len = ids.len();
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(Encoded {
            ids,
            untruncated_len,
        })
    }
}
