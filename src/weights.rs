//! Weight files: safetensors only, memory-mapped, with errors that name the file.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::Path;

fn file_error(path: &Path, message: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Checks that `path` is a complete safetensors file before it is mapped: pickle checkpoints
/// are refused (loading one runs arbitrary code), and a truncated file is caught here rather
/// than as a fault when a missing page is touched.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "ckpt" | "pt" | "pth" | "bin" | "pkl") {
        return Err(file_error(
            path,
            "is a pickle checkpoint; these can run arbitrary code when loaded, so only \
             safetensors files are read (convert it with diffusers or safetensors first)",
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e.to_string()))?;
    // SAFETY: the map is read-only and dropped before returning; a concurrent truncation by
    // another process is the only hazard, as with any mmap.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(path, e.to_string()))?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
    let data_len = mmap.len() - 8 - header_len;
    let needed = metadata
        .tensors()
        .values()
        .map(|info| info.data_offsets.1)
        .max()
        .unwrap_or(0);
    if needed > data_len {
        return Err(file_error(
            path,
            format!("is truncated: its header needs {needed} bytes of tensor data, the file has {data_len}"),
        ));
    }
    Ok(())
}

/// A memory-mapped [`VarBuilder`] over safetensors files, converting to `dtype`.
pub fn var_builder(paths: &[&Path], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for path in paths {
        check_safetensors(path)?;
    }
    // SAFETY: the files were just checked to be complete safetensors files; they are mapped
    // read-only.
    unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.map_err(Error::from)
}
