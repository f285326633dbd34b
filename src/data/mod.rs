//! Datasets: the IDX files of MNIST and Fashion-MNIST.

pub mod folder;
pub mod idx;
