//! The public judges of `../shared/judges/<dataset>/`: a small CNN per 28x28 gray dataset that
//! scores generated samples by predicted class, confidence, and the Fréchet distance of its
//! 128 penultimate features to the test set's (FID's recipe, Heusel et al. 2017, with this
//! network in place of Inception).

use crate::error::{Error, Result};
use crate::weights::load_checked;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use std::path::{Path, PathBuf};

/// The public judges' feature width (the penultimate layer's).
pub const FEATURES: usize = 128;

/// The judges and class lists shipped with the source (copies of `../shared`'s, so that a
/// fresh clone evaluates without it).
fn shipped(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// The shipped judge folder of a dataset (`mnist`, `fashion-mnist`, `emoji`, `doodles`), when
/// there is one.
pub fn shipped_judge(name: &str) -> Option<PathBuf> {
    Some(shipped("judges").join(name)).filter(|p| p.join("model.safetensors").is_file())
}

/// The shipped `classes.json` of a dataset, when there is one.
pub fn shipped_classes(name: &str) -> Option<PathBuf> {
    Some(shipped("classes").join(format!("{name}.json"))).filter(|p| p.is_file())
}

/// The judge's best-achievable Fréchet distance for `n` training images (its reference.json).
pub fn fd_floor(judge: &Path, n: usize) -> Option<f64> {
    let text = std::fs::read_to_string(judge.join("reference.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get(format!("fd_train{n}_subset_vs_test"))?.as_f64()
}

/// What a judge takes and tells apart: (channels, size, size) images in [-1, 1], `classes`
/// classes. The public judges are grey 28x28 with 10 classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JudgeShape {
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
    /// The two convolutions' channels and the feature width: [32, 64, 128] for the public
    /// judges ([`JudgeShape::PUBLIC_WIDTHS`]).
    pub widths: [usize; 3],
}

impl JudgeShape {
    /// The public judges' shape (MNIST, Fashion-MNIST).
    pub const GREY_28: Self = Self {
        channels: 1,
        size: 28,
        classes: 10,
        widths: Self::PUBLIC_WIDTHS,
    };

    pub const PUBLIC_WIDTHS: [usize; 3] = [32, 64, FEATURES];

    /// The first linear layer's inputs: the second convolution's maps, size / 4 squared.
    fn flat(&self) -> usize {
        self.widths[1] * (self.size / 4) * (self.size / 4)
    }

    /// The shape a judge's weights file holds: the input channels and widths from `conv1`,
    /// `conv2` and `fc1`, the size from `fc1`'s inputs, the classes from `fc2`.
    pub fn of_weights(path: &Path) -> Result<Self> {
        let shapes = crate::weights::tensor_shapes(path)?;
        let dim = |name: &str, axis: usize| {
            shapes
                .get(name)
                .and_then(|s| s.get(axis).copied())
                .ok_or_else(|| crate::error::file_error(path, format!("has no tensor {name}")))
        };
        let widths = [
            dim("conv1.weight", 0)?,
            dim("conv2.weight", 0)?,
            dim("fc1.weight", 0)?,
        ];
        let flat = dim("fc1.weight", 1)?;
        let maps = widths[1].max(1);
        let side = ((flat / maps) as f64).sqrt().round() as usize;
        if maps * side * side != flat {
            return Err(crate::error::file_error(
                path,
                format!("fc1.weight takes {flat} inputs, not {maps} maps of a square size"),
            ));
        }
        Ok(Self {
            channels: dim("conv1.weight", 1)?,
            size: 4 * side,
            classes: dim("fc2.weight", 0)?,
            widths,
        })
    }
}

/// conv 3x3 (C -> W1) - ReLU - maxpool 2 - conv 3x3 (W1 -> W2) - ReLU - maxpool 2 - linear
/// W2 (S/4)^2 -> F - ReLU (features) - linear F -> K (logits); for the public judges C = 1,
/// S = 28, K = 10, (W1, W2, F) = (32, 64, 128).
pub struct Judge {
    pub shape: JudgeShape,
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

/// What the judge says about a batch.
pub struct Verdict {
    pub features: Tensor,
    pub logits: Tensor,
}

impl Judge {
    pub fn new(shape: JudgeShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let [w1, w2, features] = shape.widths;
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            shape,
            conv1: conv2d(shape.channels, w1, 3, same, vb.pp("conv1"))?,
            conv2: conv2d(w1, w2, 3, same, vb.pp("conv2"))?,
            fc1: linear(shape.flat(), features, vb.pp("fc1"))?,
            fc2: linear(features, shape.classes, vb.pp("fc2"))?,
        })
    }

    /// Loads `dir/model.safetensors` (a judge folder), its shape read from the weights.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join("model.safetensors");
        let shape = JudgeShape::of_weights(&path)?;
        load_checked(&path, DType::F32, device, |vb| Ok(Self::new(shape, vb)?))
    }

    /// Scores (N, C, S, S) images already normalised to [-1, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Verdict> {
        let (_, c, h, w) = x.dims4()?;
        let s = self.shape;
        if (c, h, w) != (s.channels, s.size, s.size) {
            return Err(Error::Msg(format!(
                "the judge scores (N, {}, {}, {}) images, got {:?}",
                s.channels,
                s.size,
                s.size,
                x.dims()
            )));
        }
        let h = self.conv1.forward(x)?.relu()?.max_pool2d(2)?;
        let h = self.conv2.forward(&h)?.relu()?.max_pool2d(2)?;
        let features = self.fc1.forward(&h.flatten_from(1)?)?.relu()?;
        let logits = self.fc2.forward(&features)?;
        Ok(Verdict { features, logits })
    }

    /// Scores images in [-1, 1] as the judge's README asks: quantised to 8 bits first, as a saved
    /// PNG would be, in batches of 500.
    pub fn score(&self, images: &Tensor) -> Result<Verdict> {
        let quantised = quantize_u8(images)?;
        let n = quantised.dim(0)?;
        let mut features = Vec::new();
        let mut logits = Vec::new();
        for start in (0..n).step_by(500) {
            let v = self.forward(&quantised.narrow(0, start, 500.min(n - start))?)?;
            features.push(v.features);
            logits.push(v.logits);
        }
        Ok(Verdict {
            features: Tensor::cat(&features, 0)?,
            logits: Tensor::cat(&logits, 0)?,
        })
    }
}

/// Images from a pipeline ((N, C, H, W) in [0, 1]) as a judge of `shape` reads them, in
/// [-1, 1]: colour averaged to grey for a grey judge (grey repeated for a colour one), shrunk by
/// the whole factor `H / size` (box average: the embedded default draws a 28x28 picture doubled
/// and centred on 64x64, which comes back as the centre of 32x32), then the centre `size` x
/// `size`.
pub fn judge_view(images: &Tensor, shape: JudgeShape) -> Result<Tensor> {
    let (_, c, h, w) = images.dims4()?;
    let size = shape.size;
    if h < size || w < size {
        return Err(Error::Msg(format!(
            "the judge scores {size}x{size} images; these are {h}x{w}"
        )));
    }
    let images = match (c, shape.channels) {
        (c, k) if c == k => images.clone(),
        (3, 1) => images.mean_keepdim(1)?,
        (1, k) => images.repeat((1, k, 1, 1))?,
        (c, k) => {
            return Err(Error::Msg(format!(
                "the judge reads {k}-channel images; these have {c} channels"
            )))
        }
    };
    let factor = h.min(w) / size;
    let images = if factor > 1 {
        images.avg_pool2d(factor)?
    } else {
        images
    };
    let (_, _, h, w) = images.dims4()?;
    Ok(images
        .narrow(2, (h - size) / 2, size)?
        .narrow(3, (w - size) / 2, size)?
        .affine(2.0, -1.0)?)
}

/// The class names of a judge folder's `classes.json` (`{"classes": [...]}`).
pub fn judge_class_names(dir: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Classes {
        classes: Vec<String>,
    }
    let classes: Classes = crate::model::config::read_json(&dir.join("classes.json"))?;
    Ok(classes.classes)
}

/// round((x + 1) 127.5) clamped to 0..255, then back to u8 / 127.5 - 1.
pub fn quantize_u8(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?
        .affine(127.5, 127.5)?
        .round()?
        .clamp(0f32, 255f32)?
        .affine(1.0 / 127.5, -1.0)?)
}

impl Verdict {
    /// The most probable class of each image.
    pub fn predicted(&self) -> Result<Vec<u32>> {
        Ok(self.logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }

    /// Mean of the largest softmax probability.
    pub fn mean_confidence(&self) -> Result<f64> {
        let probs = candle_nn::ops::softmax(&self.logits, D::Minus1)?;
        Ok(probs
            .max(D::Minus1)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?)
    }

    /// How many images fall in each class.
    pub fn histogram(&self) -> Result<Vec<usize>> {
        let mut counts = vec![0usize; self.logits.dim(D::Minus1)?];
        for c in self.predicted()? {
            counts[c as usize] += 1;
        }
        Ok(counts)
    }

    /// The fraction predicted as `labels` (the class each image was asked to be).
    pub fn accuracy(&self, labels: &[u32]) -> Result<f64> {
        let predicted = self.predicted()?;
        let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(hits as f64 / labels.len().max(1) as f64)
    }
}

/// Mean and covariance (divisor N - 1) of a feature distribution, in f64.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub mean: DVector<f64>,
    pub covariance: DMatrix<f64>,
}

impl FeatureStats {
    /// From (N, D) features.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let (n, d) = features.dims2()?;
        if n < 2 {
            return Err(Error::Msg(format!(
                "a covariance needs at least 2 samples, got {n}"
            )));
        }
        let rows = features.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut mean = DVector::zeros(d);
        for row in &rows {
            mean += DVector::from_column_slice(row);
        }
        mean /= n as f64;
        let mut covariance = DMatrix::zeros(d, d);
        for row in &rows {
            let centred = DVector::from_column_slice(row) - &mean;
            covariance += &centred * centred.transpose();
        }
        covariance /= (n - 1) as f64;
        Ok(Self { mean, covariance })
    }

    /// `mu` and `sigma` of a judge's `test_stats.safetensors`.
    pub fn load(path: &Path) -> Result<Self> {
        crate::weights::check_safetensors(path)?;
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let get = |name: &str| {
            tensors.get(name).ok_or_else(|| Error::File {
                path: path.display().to_string(),
                message: format!("missing tensor {name}"),
            })
        };
        let mu = get("mu")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let sigma = get("sigma")?.to_dtype(DType::F64)?;
        let d = mu.len();
        if sigma.dims() != [d, d] {
            return Err(Error::File {
                path: path.display().to_string(),
                message: format!("sigma has shape {:?}, expected [{d}, {d}]", sigma.dims()),
            });
        }
        let rows = sigma.to_vec2::<f64>()?;
        Ok(Self {
            mean: DVector::from_vec(mu),
            covariance: DMatrix::from_fn(d, d, |i, j| rows[i][j]),
        })
    }
}

/// A^1/2 of a symmetric positive semi-definite matrix, V diag(sqrt(max(w, 0))) V^T.
fn sqrt_psd(a: &DMatrix<f64>) -> DMatrix<f64> {
    let eigen = SymmetricEigen::new(a.clone());
    let roots = eigen.eigenvalues.map(|w| w.max(0.0).sqrt());
    &eigen.eigenvectors * DMatrix::from_diagonal(&roots) * eigen.eigenvectors.transpose()
}

/// FD = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_b^1/2 S_a S_b^1/2)^1/2), the symmetric
/// form of Tr((S_a S_b)^1/2) that needs only symmetric eigendecompositions.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> f64 {
    let diff = &a.mean - &b.mean;
    let root_b = sqrt_psd(&b.covariance);
    let middle = &root_b * &a.covariance * &root_b;
    // Symmetrise against rounding before the eigendecomposition.
    let middle = (&middle + middle.transpose()) * 0.5;
    let cross = sqrt_psd(&middle).trace();
    diff.dot(&diff) + a.covariance.trace() + b.covariance.trace() - 2.0 * cross
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frechet_distance_of_gaussians_in_closed_form() {
        // Diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
        let a = FeatureStats {
            mean: DVector::from_vec(vec![0.0, 1.0]),
            covariance: DMatrix::from_diagonal(&DVector::from_vec(vec![4.0, 1.0])),
        };
        let b = FeatureStats {
            mean: DVector::from_vec(vec![1.0, 1.0]),
            covariance: DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 9.0])),
        };
        let expected = 1.0 + (2.0f64 - 1.0).powi(2) + (1.0f64 - 3.0).powi(2);
        assert!((frechet_distance(&a, &b) - expected).abs() < 1e-9);
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
    }

    #[test]
    fn quantisation_rounds_to_the_8_bit_grid() {
        let x = Tensor::new(&[-1.0f32, 1.0, 0.0, 2.0], &Device::Cpu).unwrap();
        let q = quantize_u8(&x).unwrap().to_vec1::<f32>().unwrap();
        let expected = [-1.0, 1.0, 128.0 / 127.5 - 1.0, 1.0];
        for (a, b) in q.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{q:?}");
        }
    }
}
