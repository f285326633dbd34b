//! The embedded default model: the diffusers folder `weights/` compiled into the binary, so an
//! installed `txt2img` draws with no source tree, no network and no download.
//!
//! The loaders read a folder (memory-mapped safetensors, JSON configs, tokenizer files by path),
//! as they do for every other model, so the embedded files are written once to a folder in the
//! user's cache, named by their content, and loaded from there like any diffusers folder. One
//! loading path serves every model, and the weights are mapped from disk rather than copied out
//! of the binary on each run.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The files of the pipeline, relative to its folder.
const FILES: [(&str, &[u8]); 12] = [
    ("concepts.json", include_bytes!("../weights/concepts.json")),
    (
        "model_index.json",
        include_bytes!("../weights/model_index.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_bytes!("../weights/scheduler/scheduler_config.json"),
    ),
    (
        "text_encoder/config.json",
        include_bytes!("../weights/text_encoder/config.json"),
    ),
    (
        "text_encoder/model.safetensors",
        include_bytes!("../weights/text_encoder/model.safetensors"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_bytes!("../weights/tokenizer/special_tokens_map.json"),
    ),
    (
        "tokenizer/tokenizer.json",
        include_bytes!("../weights/tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_bytes!("../weights/tokenizer/tokenizer_config.json"),
    ),
    (
        "unet/config.json",
        include_bytes!("../weights/unet/config.json"),
    ),
    (
        "unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../weights/unet/diffusion_pytorch_model.safetensors"),
    ),
    (
        "vae/config.json",
        include_bytes!("../weights/vae/config.json"),
    ),
    (
        "vae/diffusion_pytorch_model.safetensors",
        include_bytes!("../weights/vae/diffusion_pytorch_model.safetensors"),
    ),
];

/// FNV-1a over the bytes of `parts`, one after another: a short, stable name for content (not a
/// defence against tampering).
pub fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in parts.into_iter().flatten() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Every file's name, a zero byte and its bytes, hashed: names the folder, so binaries with
/// different embedded weights never share one.
fn content_hash() -> u64 {
    fnv1a(
        FILES
            .iter()
            .flat_map(|(name, bytes)| [name.as_bytes(), &[0u8][..], &bytes[..]]),
    )
}

/// This crate's cache folder (the embedded model's copy, converted checkpoints):
/// `$DIFFUSE_CACHE`, else `$XDG_CACHE_HOME/diffuse`, else `~/.cache/diffuse`, else the
/// temporary folder.
pub fn cache_root() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("DIFFUSE_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("diffuse")))
        .or_else(|| var("HOME").map(|p| p.join(".cache").join("diffuse")))
        .unwrap_or_else(|| std::env::temp_dir().join("diffuse"))
}

/// Whether `dir` holds every embedded file at its full length. Lengths, not contents: the
/// folder's name already carries the content hash, and reading 17 MB back on every run would
/// cost more than the check is worth; a cut or missing file is what a kill or a clean-up
/// leaves.
fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

fn write_files(dir: &Path) -> std::io::Result<()> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// The embedded model as a diffusers folder, written on first use (or when a file there was
/// changed or lost) into a fresh folder that is renamed into place, so a concurrent run or a
/// kill never leaves a half-written model to load.
pub fn model_dir() -> Result<PathBuf> {
    model_dir_in(&cache_root())
}

/// [`model_dir`] under `root`.
pub fn model_dir_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("embedded-model-{:016x}", content_hash()));
    if is_complete(&dir) {
        return Ok(dir);
    }
    let cache_error = |path: &Path, e: std::io::Error| Error::File {
        path: path.display().to_string(),
        message: format!(
            "cannot write the embedded default model here ({e}); set DIFFUSE_CACHE to a \
             writable folder"
        ),
    };
    std::fs::create_dir_all(root).map_err(|e| cache_error(root, e))?;
    let staging = root.join(format!(".embedded-model-{}.partial", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    write_files(&staging).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        cache_error(&staging, e)
    })?;
    if dir.exists() {
        // An older copy that was tampered with or cut short.
        let _ = std::fs::remove_dir_all(&dir);
    }
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process put its copy in place first; ours is not needed.
        let _ = std::fs::remove_dir_all(&staging);
    }
    if is_complete(&dir) {
        Ok(dir)
    } else {
        Err(Error::File {
            path: dir.display().to_string(),
            message: "the embedded default model could not be written completely; set \
                      DIFFUSE_CACHE to a writable folder"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_damaged_copy_is_written_anew() {
        let root = std::env::temp_dir().join(format!("diffuse-embedded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = super::model_dir_in(&root).unwrap();
        assert!(super::is_complete(&dir));
        let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
        std::fs::write(&unet, b"cut short").unwrap();
        std::fs::remove_file(dir.join("vae/config.json")).unwrap();
        assert_eq!(super::model_dir_in(&root).unwrap(), dir);
        assert!(super::is_complete(&dir));
        let leftovers: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
