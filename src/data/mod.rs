//! Datasets: the IDX files of MNIST, Fashion-MNIST and the doodles, their class captions, the
//! emoji set, the pooled captioned image set the small text-to-image model trains on, and
//! folders of captioned images for fine-tuning.

pub mod captions;
pub mod emoji;
pub mod folder;
pub mod idx;
pub mod image_set;
pub mod judged_prompts;
