//! Checkpoints: one safetensors file of named tensors with string metadata (the step, the
//! config), written atomically: to a temporary file beside the target, synced, then renamed, so a
//! kill mid-write leaves the previous checkpoint intact.

use crate::error::{file_error, Error, Result};
use crate::weights::check_safetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

fn safetensors_dtype(dtype: DType) -> Result<safetensors::Dtype> {
    Ok(match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F64 => safetensors::Dtype::F64,
        DType::U32 => safetensors::Dtype::U32,
        DType::I64 => safetensors::Dtype::I64,
        DType::U8 => safetensors::Dtype::U8,
        other => return Err(Error::Msg(format!("cannot save {other:?} tensors"))),
    })
}

fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => return Err(Error::Msg(format!("cannot save {other:?} tensors"))),
    })
}

/// Writes `tensors` and `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    save_with_q8(path, tensors, metadata, &Default::default())
}

/// [`save`], the tensors named in `q8` (offset bytes, `ops::q8`) written as safetensors I8.
pub fn save_with_q8(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    q8: &std::collections::BTreeSet<String>,
) -> Result<()> {
    let stored = |(name, tensor): &(String, Tensor)| -> Result<(safetensors::Dtype, Vec<u8>)> {
        if !q8.contains(name) {
            return Ok((safetensors_dtype(tensor.dtype())?, tensor_bytes(tensor)?));
        }
        if tensor.dtype() != DType::U8 {
            return Err(Error::Msg(format!(
                "tensor {name}: q8 weights are offset bytes (U8), not {:?}",
                tensor.dtype()
            )));
        }
        let bytes = tensor_bytes(tensor)?;
        let bits = bytes.into_iter().map(crate::ops::q8::offset_byte).collect();
        Ok((safetensors::Dtype::I8, bits))
    };
    let bytes: Vec<(safetensors::Dtype, Vec<u8>)> =
        tensors.iter().map(stored).collect::<Result<_>>()?;
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, tensor), (dtype, data)) in tensors.iter().zip(&bytes) {
        let view = safetensors::tensor::TensorView::new(*dtype, tensor.dims().to_vec(), data)
            .map_err(|e| Error::Msg(format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let serialized = safetensors::serialize(views, Some(metadata))
        .map_err(|e| file_error(path, e.to_string()))?;
    write_atomically(path, &serialized)
}

/// Writes `bytes` to a temporary file in `path`'s folder, syncs it, and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e.to_string()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_error(path, format!("could not be written: {e}"))
    })
}

/// A checkpoint read back: every tensor, and the metadata.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl Loaded {
    /// The tensors whose names start with `prefix`, with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }

    /// The tensor `key`, which must have the shape `dims`; errors name the file and tensor.
    pub fn tensor_like(&self, path: &Path, key: &str, dims: &[usize]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(key)
            .ok_or_else(|| file_error(path, format!("missing tensor {key}")))?;
        if tensor.dims() != dims {
            return Err(file_error(
                path,
                format!(
                    "tensor {key} has shape {:?}, the model needs {dims:?}",
                    tensor.dims()
                ),
            ));
        }
        Ok(tensor.clone())
    }

    /// The step count stored under the metadata key `key`.
    pub fn step(&self, path: &Path, key: &str) -> Result<usize> {
        self.meta(path, key)?
            .parse()
            .map_err(|e| file_error(path, format!("{key} is not a step count: {e}")))
    }

    /// Sets each of `named` from its tensor `model.<name>`.
    pub fn restore_vars(&self, path: &Path, named: &[(String, candle_core::Var)]) -> Result<()> {
        for (name, var) in named {
            var.set(&self.tensor_like(path, &format!("model.{name}"), var.dims())?)?;
        }
        Ok(())
    }

    /// A metadata value, or an error naming the file and key.
    pub fn meta(&self, path: &Path, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| file_error(path, format!("has no \"{key}\" metadata entry")))
    }
}

/// Reads a whole checkpoint (complete-file check first, so a truncated one is named).
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    check_safetensors(path)?;
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| file_error(path, e.to_string()))?;
    Ok(Loaded { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_overwrite() {
        let dir = std::env::temp_dir().join(format!("diffuse-ckpt-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let labels = Tensor::new(&[3u32, 4], &Device::Cpu).unwrap();
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        save(
            &path,
            &[("model.a".into(), a.clone()), ("labels".into(), labels)],
            &meta,
        )
        .unwrap();
        let loaded = load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.meta(&path, "step").unwrap(), "7");
        assert!(loaded.meta(&path, "config").is_err());
        let model = loaded.with_prefix("model.");
        assert_eq!(
            model["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        // Saving again replaces the checkpoint whole.
        let b = (a.clone() * 2.0).unwrap();
        let meta_8 = BTreeMap::from([("step".to_string(), "8".to_string())]);
        save(&path, &[("model.a".into(), b.clone())], &meta_8).unwrap();
        let reloaded = load(&path, &Device::Cpu).unwrap();
        assert_eq!(reloaded.meta(&path, "step").unwrap(), "8");
        assert_eq!(
            reloaded.with_prefix("model.")["a"]
                .to_vec2::<f32>()
                .unwrap(),
            b.to_vec2::<f32>().unwrap()
        );
        assert!(!reloaded.tensors.contains_key("labels"));
        // A write that fails (the target is a folder with a file in it) names the path, leaves
        // what was there, and no temporary file.
        let blocked = dir.join("blocked.safetensors");
        std::fs::create_dir_all(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"kept").unwrap();
        let err = save(&blocked, &[("model.a".into(), b)], &meta_8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocked.safetensors") && err.contains("could not be written"),
            "{err}"
        );
        assert_eq!(std::fs::read(blocked.join("keep")).unwrap(), b"kept");
        // A truncated file is refused by name.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = load(&path, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("tmp")
            })
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
