//! Weight files: safetensors only, memory-mapped, with errors that name the file.

use crate::error::{file_error, Error, Result};
use crate::ops::q8;
use crate::single_file::{NameMap, Source, Transform};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The string metadata of a safetensors file's header (the step and config a checkpoint
/// carries), without reading its tensors.
pub fn header_metadata(path: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    check_safetensors(path)?;
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e.to_string()))?;
    // SAFETY: read-only, dropped before returning (see check_safetensors).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(path, e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| file_error(path, format!("not a valid safetensors file: {e}")))?;
    Ok(header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
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
    if let Some(message) = truncation(&mmap) {
        return Err(file_error(path, message));
    }
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

/// Says how a safetensors file is cut short, reading only its length prefix and JSON header
/// (the safetensors crate reports a short file as merely "incomplete metadata").
fn truncation(bytes: &[u8]) -> Option<String> {
    let prefix: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let header_len = u64::from_le_bytes(prefix) as usize;
    // Longer than the format allows (100 MB): not a safetensors file at all.
    if header_len > 100_000_000 {
        return None;
    }
    let Some(header) = bytes.get(8..8usize.saturating_add(header_len)) else {
        return Some(format!(
            "is truncated: its header needs {header_len} bytes, the file has {}",
            bytes.len().saturating_sub(8)
        ));
    };
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    let needed = json
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0) as usize;
    let data_len = bytes.len() - 8 - header_len;
    (needed > data_len).then(|| {
        format!(
            "is truncated: its header needs {needed} bytes of tensor data, the file has {data_len}"
        )
    })
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

/// A component's weights: a whole safetensors file (a diffusers folder's), or its part of a
/// single-file checkpoint, with diffusers names mapped onto the file's keys.
#[derive(Debug, Clone)]
pub enum ComponentWeights {
    File(PathBuf),
    Mapped {
        path: PathBuf,
        names: std::sync::Arc<NameMap>,
    },
}

impl ComponentWeights {
    pub fn path(&self) -> &Path {
        match self {
            ComponentWeights::File(path) | ComponentWeights::Mapped { path, .. } => path,
        }
    }

    /// The shape of every weight by the name the model reads it under.
    pub fn shapes(&self) -> Result<HashMap<String, Vec<usize>>> {
        let stored = tensor_shapes(self.path())?;
        let ComponentWeights::Mapped { path, names } = self else {
            return Ok(stored);
        };
        names
            .iter()
            .map(|(name, source)| {
                let shape = stored
                    .get(&source.key)
                    .and_then(|shape| source.transform.shape(shape))
                    .ok_or_else(|| {
                        file_error(
                            path,
                            format!("tensor {} cannot be read as {name}", source.key),
                        )
                    })?;
                Ok((name.clone(), shape))
            })
            .collect()
    }
}

/// The tensor `key` of a mapped file on `dev`; i8 tensors (q8 weights, which candle has no
/// dtype for) as offset bytes (`ops::q8`).
fn load_stored(
    file: &candle_core::safetensors::MmapedSafetensors,
    key: &str,
    dev: &Device,
) -> candle_core::Result<candle_core::Tensor> {
    let view = file.get(key)?;
    if view.dtype() != safetensors::Dtype::I8 {
        return file.load(key, dev);
    }
    let bytes: Vec<u8> = view.data().iter().map(|&b| q8::offset_byte(b)).collect();
    candle_core::Tensor::from_vec(bytes, view.shape(), dev)
}

/// Every weight of a component as stored (its dtype kept) under the names the model reads,
/// transforms applied: what a conversion writes.
pub fn read_all(
    weights: &ComponentWeights,
) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let path = weights.path();
    check_safetensors(path)?;
    // SAFETY: checked above to be a complete safetensors file; mapped read-only.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| file_error(path, e.to_string()))?;
    let cpu = Device::Cpu;
    match weights {
        ComponentWeights::File(_) => file
            .tensors()
            .into_iter()
            .map(|(name, _)| Ok((name.clone(), load_stored(&file, &name, &cpu)?)))
            .collect(),
        ComponentWeights::Mapped { names, .. } => names
            .iter()
            .map(|(name, source)| {
                let stored = load_stored(&file, &source.key, &cpu)?;
                Ok((name.clone(), source.transform.apply(stored)?))
            })
            .collect(),
    }
}

/// A safetensors backend that names the file in every error, checks shapes against what the
/// model asks for, and records which tensors were used so that unexpected ones can be reported.
struct CheckedSafetensors {
    inner: candle_core::safetensors::MmapedSafetensors,
    /// For a part of a single file: the diffusers names and their sources.
    names: Option<std::sync::Arc<NameMap>>,
    file: String,
    attachments: Attachments,
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Check names and shapes only: every weight is a stride-0 view of one zero.
    shapes_only: bool,
}

impl CheckedSafetensors {
    /// The stored key and transform of the weight the model calls `name`.
    fn source(&self, name: &str) -> Option<Source> {
        match &self.names {
            None => Some(Source {
                key: name.to_string(),
                transform: Transform::Same,
            }),
            Some(names) => names.get(name).cloned(),
        }
    }

    /// Reads `name` on `dev` as the model sees it; None when the file has no such weight.
    fn read(&self, name: &str, dev: &Device) -> candle_core::Result<Option<candle_core::Tensor>> {
        let Some(source) = self.source(name) else {
            return Ok(None);
        };
        if self.inner.get(&source.key).is_err() {
            return Ok(None);
        }
        let stored = load_stored(&self.inner, &source.key, dev)?;
        Ok(Some(source.transform.apply(stored)?))
    }

    /// The shape `name` has as the model sees it.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let source = self.source(name)?;
        let view = self.inner.get(&source.key).ok()?;
        source.transform.shape(view.shape())
    }

    /// `name` as the file knows it: for a single file, its original key too.
    fn display_name(&self, name: &str) -> String {
        match self.source(name) {
            Some(source) if source.key != name => format!("{} (read as {name})", source.key),
            _ => name.to_string(),
        }
    }

    /// What a model could have read: the file's tensors, or the mapped names.
    fn available(&self) -> Vec<String> {
        match &self.names {
            None => self
                .inner
                .tensors()
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            Some(names) => names.keys().cloned().collect(),
        }
    }
}

/// What a LoRA adds to a model while it loads: updates merged into the weights they name, or
/// adapter matrices (`<module>.lora_A.weight`, `lora_B.weight`) that
/// [`crate::model::lora::LoraLinear`] applies on the fly.
#[derive(Debug, Default, Clone)]
pub struct Attachments {
    pub deltas: HashMap<String, candle_core::Tensor>,
    pub adapters: HashMap<String, candle_core::Tensor>,
}

/// The shape of every tensor in a safetensors file, from its header.
pub fn tensor_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    check_safetensors(path)?;
    // SAFETY: checked above to be a complete safetensors file; mapped read-only.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| file_error(path, e.to_string()))?;
    Ok(file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

struct SharedChecked(std::sync::Arc<CheckedSafetensors>);

impl candle_nn::var_builder::SimpleBackend for SharedChecked {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let this = &self.0;
        let Some(stored) = this.shape_of(name) else {
            candle_core::bail!(
                "{}: missing tensor {name} (the config needs shape {:?})",
                this.file,
                shape.dims()
            )
        };
        if stored != shape.dims() {
            candle_core::bail!(
                "{}: tensor {} has shape {stored:?}, the config needs {:?}",
                this.file,
                this.display_name(name),
                shape.dims()
            )
        }
        this.used.lock().expect("lock").insert(name.to_string());
        if this.shapes_only {
            return candle_core::Tensor::zeros((), dtype, dev)?.broadcast_as(shape);
        }
        let Some(weight) = this.read(name, dev)? else {
            candle_core::bail!("{}: missing tensor {name}", this.file)
        };
        if weight.dtype() == DType::U8 && dtype != DType::U8 {
            candle_core::bail!(
                "{}: tensor {} holds 8-bit integers (q8), which this layer cannot read; \
                 only linear and convolution weights with a {} may be q8",
                this.file,
                this.display_name(name),
                q8::SCALE_NAME
            )
        }
        if weight.dtype() == DType::U8 && this.attachments.deltas.contains_key(name) {
            candle_core::bail!(
                "{}: tensor {} is q8; a LoRA merges into float weights (load the original \
                 model with --dtype q8 to quantize after merging)",
                this.file,
                this.display_name(name)
            )
        }
        match this.attachments.deltas.get(name) {
            // The merge in f32, so that a half-precision model gets the update rounded once.
            Some(delta) => (weight.to_dtype(DType::F32)? + delta.to_device(dev)?)?.to_dtype(dtype),
            None => weight.to_dtype(dtype),
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.0.used.lock().expect("lock").insert(name.to_string());
        if let Some(adapter) = self.0.attachments.adapters.get(name) {
            return adapter.to_device(dev)?.to_dtype(dtype);
        }
        match self.0.read(name, dev)? {
            Some(weight) => weight.to_dtype(dtype),
            None => candle_core::bail!("{}: missing tensor {name}", self.0.file),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.attachments.adapters.contains_key(name) || self.0.shape_of(name).is_some()
    }
}

/// Builds a model from one safetensors file and refuses files with tensors the model does not
/// use (a checkpoint for another configuration), naming them. Buffers that hold no weights
/// (`position_ids`) are allowed.
pub fn load_checked<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    load_checked_with(path, dtype, device, Attachments::default(), build)
}

/// [`load_checked`] with LoRA updates merged or adapters attached; an update or adapter the
/// model never asks for is an error that names it.
pub fn load_checked_with<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    attachments: Attachments,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    let weights = ComponentWeights::File(path.to_path_buf());
    load_component(&weights, dtype, false, device, attachments, build)
}

/// Checks that `build` finds every weight it needs in `weights` with the right shape, and that
/// nothing is left over, without reading any weight.
pub fn check_component<T>(
    weights: &ComponentWeights,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<()> {
    build_component(
        weights,
        DType::F32,
        &Device::Cpu,
        Attachments::default(),
        true,
        None::<fn(_) -> QuantizingBackend>,
        build,
    )
    .map(|_| ())
}

/// [`load_checked_with`] for a component's weights wherever they are stored; with `q8`, the
/// linear and convolution weights are quantized as they load ([`QuantizingBackend`]).
pub fn load_component<T>(
    weights: &ComponentWeights,
    dtype: DType,
    q8: bool,
    device: &Device,
    attachments: Attachments,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    let view = q8.then_some(QuantizingBackend::wrapping);
    build_component(weights, dtype, device, attachments, false, view, build)
}

/// The q8 tensors (`ops::q8`) that loading `weights` with `--dtype q8` makes, by name: each
/// quantized layer's `weight` as offset bytes (U8) and its `weight_scale` (F32). What
/// `diffuse convert --dtype q8` writes in place of the float weights.
pub fn quantized_tensors(
    weights: &ComponentWeights,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let made = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let view = {
        let made = made.clone();
        move |inner| QuantizingBackend {
            inner,
            made: Some(made),
        }
    };
    let device = Device::Cpu;
    build_component(
        weights,
        DType::F32,
        &device,
        Attachments::default(),
        false,
        Some(view),
        build,
    )?;
    let made = std::mem::take(&mut *made.lock().expect("lock"));
    Ok(made)
}

/// A view of float weights as a q8 file (`ops::q8`) would hold them: it offers
/// `<layer>.weight_scale` beside every `<layer>.weight`, and gives the weight as offset bytes
/// when asked for U8, both computed from the stored weight; so the layers that read q8 weights
/// (`dense::linear`, `blocks::conv`) find them, and every other tensor reads as stored. A
/// weight already stored as q8 passes through.
pub struct QuantizingBackend {
    inner: Box<dyn candle_nn::var_builder::SimpleBackend>,
    /// Where the tensors it makes are kept (for a conversion), if anywhere.
    made: Option<QuantizedTensors>,
}

type QuantizedTensors =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, candle_core::Tensor>>>;

impl QuantizingBackend {
    pub fn wrapping(inner: Box<dyn candle_nn::var_builder::SimpleBackend>) -> Self {
        Self { inner, made: None }
    }

    fn keep(&self, name: &str, tensor: &candle_core::Tensor) {
        if let Some(made) = &self.made {
            made.lock()
                .expect("lock")
                .insert(name.to_string(), tensor.clone());
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for QuantizingBackend {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.inner.contains_tensor(name) && !name.ends_with(q8::SCALE_NAME) {
            let scale_name = format!("{name}_scale");
            let stored_q8 = self.inner.contains_tensor(&scale_name);
            if dtype != DType::U8 || stored_q8 || !name.ends_with("weight") {
                return self.inner.get(shape, name, hints, dtype, dev);
            }
            let weight = self.inner.get(shape, name, hints, DType::F32, dev)?;
            let (bytes, scales) = q8::quantize(&weight, name)?;
            self.keep(name, &bytes);
            self.keep(&scale_name, &scales);
            return Ok(bytes);
        }
        match name.strip_suffix(q8::SCALE_NAME) {
            Some(layer) if !self.inner.contains_tensor(name) => {
                let weight_name = format!("{layer}weight");
                let weight = self.inner.get_unchecked(&weight_name, DType::F32, dev)?;
                let scales = q8::scales(&weight, &weight_name)?;
                if scales.dims() != shape.dims() {
                    candle_core::bail!(
                        "{weight_name}: {} output channels, the layer expects {:?}",
                        scales.elem_count(),
                        shape.dims()
                    )
                }
                Ok(scales)
            }
            _ => self.inner.get(shape, name, hints, dtype, dev),
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
            || name
                .strip_suffix(q8::SCALE_NAME)
                .is_some_and(|layer| self.inner.contains_tensor(&format!("{layer}weight")))
    }
}

type Backend = Box<dyn candle_nn::var_builder::SimpleBackend>;

fn build_component<T, V: candle_nn::var_builder::SimpleBackend + 'static>(
    weights: &ComponentWeights,
    dtype: DType,
    device: &Device,
    attachments: Attachments,
    shapes_only: bool,
    view: Option<impl FnOnce(Backend) -> V>,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    let path = weights.path();
    check_safetensors(path)?;
    // SAFETY: checked above to be a complete safetensors file; mapped read-only.
    let inner = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| file_error(path, e.to_string()))?;
    let names = match weights {
        ComponentWeights::File(_) => None,
        ComponentWeights::Mapped { names, .. } => Some(names.clone()),
    };
    let checked = std::sync::Arc::new(CheckedSafetensors {
        inner,
        names,
        file: path.display().to_string(),
        attachments,
        used: Default::default(),
        shapes_only,
    });
    let backend: Backend = Box::new(SharedChecked(checked.clone()));
    let backend: Backend = match view {
        Some(view) => Box::new(view(backend)),
        None => backend,
    };
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    let model = build(vb)?;
    let used = checked.used.lock().expect("lock");
    let unexpected: Vec<String> = checked
        .available()
        .into_iter()
        .filter(|name| !used.contains(name) && !name.ends_with("position_ids"))
        .collect();
    let unused_lora: Vec<&String> = checked
        .attachments
        .deltas
        .keys()
        .chain(checked.attachments.adapters.keys())
        .filter(|name| !used.contains(*name))
        .collect();
    if let Some(name) = unused_lora.first() {
        return Err(file_error(
            path,
            format!(
                "the model never reads {name}, which a LoRA adapts ({} such in all); LoRA applies \
                 to weights the model loads",
                unused_lora.len()
            ),
        ));
    }
    if !unexpected.is_empty() {
        let mut sorted = unexpected.clone();
        sorted.sort();
        let shown: Vec<String> = sorted
            .iter()
            .take(5)
            .map(|name| checked.display_name(name))
            .collect();
        return Err(file_error(
            path,
            format!(
                "has {} tensors the config does not use ({}{}): is it for another model configuration?",
                sorted.len(),
                shown.join(", "),
                if sorted.len() > 5 { ", ..." } else { "" }
            ),
        ));
    }
    Ok(model)
}
