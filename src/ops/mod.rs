//! Kernels and runtime settings, the layer everything else stands on: tensor helpers (`tensor`),
//! the process's numeric settings and memory readings (`runtime`), the adaptive ODE integrator
//! (`ode`), and the CPU ops with their own backward passes: convolution as in-place matrix
//! products (`conv_gemm`), convolution as shifted views for GPUs (`im2col`), blocked attention
//! (`attention`), fused group and layer norm (`norm`), activations with their derivatives
//! (`pointwise`), upsampling and per-plane shifts (`planes`), and the vectorised element-wise
//! functions they share (`vector_math`); bf16 products for inference (`gemm_bf16`) on
//! AVX512_BF16 or AMX tiles (`amx`); 3x3 convolutions by Winograd's F(2x2, 3x3) (`winograd`) and,
//! over batches of small maps, directly (`direct_conv`).

pub mod amx;
pub mod attention;
pub mod conv_gemm;
pub mod copy;
pub mod direct_conv;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod im2col;
pub mod linear;
pub mod norm;
pub mod ode;
pub mod planes;
pub mod pointwise;
pub mod q8;
pub mod runtime;
pub mod tensor;
pub mod vector_math;
pub mod winograd;
