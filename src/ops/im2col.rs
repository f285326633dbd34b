//! Convolution as unfolding ("im2col") made of shifted views and one batched matrix product,
//! for training on GPUs: candle 0.11 computes conv2d's input gradient there with a direct
//! transposed-convolution kernel. (On the CPU, `conv_gemm` does the same products in place.)

use candle_core::{Result, Tensor};

/// conv2d(x, weight) + bias with the unfolding made of shifted views stacked (one per kernel tap)
/// and one batched matrix product: only ops that every candle backend has, forward and backward.
/// Used for training on GPUs, where candle 0.11 computes conv2d's input gradient with a direct
/// transposed-convolution kernel instead of a matrix product.
pub fn conv2d_taps(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let out_h = (h + 2 * padding - kh) / stride + 1;
    let out_w = (w + 2 * padding - kw) / stride + 1;
    // Tap (ky, kx) reads rows ky, ky + s, ..., so the padded image needs ky + s Ho rows; the
    // extra zero rows at the far edge are never read for a real output.
    let extra_h = (kh - 1 + stride * out_h).saturating_sub(h + 2 * padding);
    let extra_w = (kw - 1 + stride * out_w).saturating_sub(w + 2 * padding);
    let padded = x
        .pad_with_zeros(2, padding, padding + extra_h)?
        .pad_with_zeros(3, padding, padding + extra_w)?;
    let mut taps = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let tap = padded
                .narrow(2, ky, stride * out_h)?
                .narrow(3, kx, stride * out_w)?;
            let tap = if stride == 1 {
                tap
            } else {
                tap.reshape((b, c, out_h, stride, out_w, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, out_h, out_w))?
            };
            taps.push(tap);
        }
    }
    // (B, C, kh kw, Ho, Wo): the row order (c, ky, kx) of the flattened kernel.
    let columns = Tensor::stack(&taps, 2)?.reshape((b, c * kh * kw, out_h * out_w))?;
    let kernel = weight
        .reshape((1, o, c * kh * kw))?
        .broadcast_as((b, o, c * kh * kw))?;
    let out = kernel
        .contiguous()?
        .matmul(&columns)?
        .reshape((b, o, out_h, out_w))?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::ops::tensor::seeded_randn as seeded;

    type Conv = fn(&Tensor, &Tensor, Option<&Tensor>, usize, usize) -> Result<Tensor>;

    /// Forward values and all three gradients equal candle's own conv2d, for stride 1 and 2,
    /// odd and even sizes, 3x3 and 1x1 kernels.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let variants: [(&str, Conv); 1] = [("conv2d_taps", conv2d_taps)];
        let cases = [
            (3, 1, 1, 7),
            (3, 2, 1, 7),
            (3, 2, 1, 8),
            (3, 1, 0, 5),
            (1, 1, 0, 6),
        ];
        for (name, conv) in variants {
            for (kernel, stride, padding, size) in cases {
                let x = Var::from_tensor(&seeded(&[2, 3, size, size], 1)).unwrap();
                let weight = Var::from_tensor(&seeded(&[4, 3, kernel, kernel], 2)).unwrap();
                let bias = Var::from_tensor(&seeded(&[4], 3)).unwrap();
                let reference = x
                    .conv2d(&weight, padding, stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap();
                let ours = conv(&x, &weight, Some(&bias), stride, padding).unwrap();
                assert_eq!(ours.dims(), reference.dims(), "{name}");
                let diff = |a: &Tensor, b: &Tensor| {
                    crate::ops::tensor::max_abs(&(a - b).unwrap()).unwrap()
                };
                assert!(diff(&ours, &reference) < 1e-5, "{name}");
                let probe = seeded(ours.dims(), 4);
                let g_ref = (&reference * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_ours = (&ours * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for var in [&x, &weight, &bias] {
                    let (a, b) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
                    assert!(
                        diff(a, b) < 1e-4,
                        "{name} kernel {kernel} stride {stride} size {size}: {}",
                        diff(a, b)
                    );
                }
            }
        }
        let _ = Device::Cpu;
    }
}
