//! Datasets: the IDX files of MNIST and Fashion-MNIST, their class captions, and folders of
//! captioned images.

pub mod captions;
pub mod folder;
pub mod idx;
