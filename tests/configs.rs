//! Every training config in `configs/` reads as the config of the command its header names, with
//! its paths taken from the file's folder.

use diffuse::train::config::{JudgeTrainConfig, TrainingConfig, VaeTrainConfig};
use std::path::{Path, PathBuf};

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn every_training_config_reads() {
    let mut read = 0;
    for entry in std::fs::read_dir(configs()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.extension().is_none_or(|e| e != "toml") || name.starts_with("finetune") {
            continue;
        }
        let out_dir = if name.starts_with("judge") {
            JudgeTrainConfig::from_file(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .train
                .out_dir
        } else if name.contains("vae") {
            VaeTrainConfig::from_file(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .train
                .out_dir
        } else {
            match TrainingConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}")) {
                TrainingConfig::Pixel(c) => c.train.out_dir,
                TrainingConfig::Latent(c) => {
                    assert!(c.model.tokenizer.starts_with(configs()), "{name}");
                    c.train.out_dir
                }
            }
        };
        // `../runs/<name>` from configs/: the repository's runs/ folder.
        assert!(
            out_dir.starts_with(configs()),
            "{name}: {}",
            out_dir.display()
        );
        assert_eq!(
            out_dir.parent().unwrap().file_name().unwrap(),
            "runs",
            "{name}"
        );
        read += 1;
    }
    assert!(read >= 9, "{read} configs read");
}
