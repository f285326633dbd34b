//! The fine-tuning folder reader on a folder with every kind of image and every kind of bad
//! file: what it keeps, what it skips (by name, with the reason), what stops it before any work.

use candle_core::Device;
use diffuse::data::folder::{load_square, FolderOptions, ImageFolder, MissingCaption};
use image::{DynamicImage, ImageBuffer, Luma, Rgb, Rgba};
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-folder-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A folder with a JPEG (sidecar caption), a 16-bit gray PNG in a subfolder (metadata.jsonl), an
/// RGBA WebP (sidecar), and the bad files: not an image, zero bytes, a caption without an image,
/// a huge image, and a README.
fn mixed_folder() -> PathBuf {
    let dir = temp_dir("mixed");
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(64, 32, Rgb([200u8, 20, 20])))
        .save(dir.join("red.jpg"))
        .unwrap();
    write(&dir.join("red.txt"), "a red thing\n");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    DynamicImage::ImageLuma16(ImageBuffer::from_fn(40, 50, |x, _| Luma([x as u16 * 1600])))
        .save(dir.join("sub/gray16.png"))
        .unwrap();
    write(
        &dir.join("sub/metadata.jsonl"),
        "{\"file_name\": \"gray16.png\", \"text\": \"a gray ramp\"}\n",
    );
    DynamicImage::ImageRgba8(ImageBuffer::from_pixel(30, 30, Rgba([0u8, 0, 255, 128])))
        .save(dir.join("blue.webp"))
        .unwrap();
    write(&dir.join("blue.txt"), "a blue square");
    write(&dir.join("broken.png"), "this is not a PNG");
    write(&dir.join("broken.txt"), "a broken image");
    write(&dir.join("empty.jpg"), "");
    write(&dir.join("empty.txt"), "nothing");
    write(&dir.join("orphan.txt"), "a caption without its image");
    DynamicImage::ImageLuma8(ImageBuffer::from_pixel(20000, 1, Luma([9u8])))
        .save(dir.join("huge.png"))
        .unwrap();
    write(&dir.join("huge.txt"), "a very wide line");
    write(&dir.join("README.md"), "not data");
    dir
}

fn reason_for<'a>(folder: &'a ImageFolder, name: &str) -> &'a str {
    folder
        .skipped
        .iter()
        .find(|s| s.path.file_name().unwrap() == name)
        .map(|s| s.reason.as_str())
        .unwrap_or_else(|| panic!("{name} was not skipped: {:?}", folder.skipped))
}

#[test]
fn keeps_every_image_kind_and_skips_bad_files_by_name() {
    let dir = mixed_folder();
    let folder = ImageFolder::scan(&dir, &FolderOptions::default()).unwrap();
    let mut kept: Vec<(String, String)> = folder
        .examples
        .iter()
        .map(|e| {
            (
                e.path.file_name().unwrap().to_string_lossy().into_owned(),
                e.caption.clone(),
            )
        })
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            ("blue.webp".to_string(), "a blue square".to_string()),
            ("gray16.png".into(), "a gray ramp".into()),
            ("red.jpg".into(), "a red thing".into()),
        ]
    );
    assert!(reason_for(&folder, "broken.png").contains("not a readable image"));
    assert!(reason_for(&folder, "empty.jpg").contains("0 bytes"));
    assert!(reason_for(&folder, "orphan.txt").contains("without an image"));
    assert!(reason_for(&folder, "huge.png").contains("too large"));
    assert_eq!(folder.skipped.len(), 4, "{:?}", folder.skipped);
    assert_eq!(folder.ignored, 1, "README.md is counted, not read");

    // Every kind decodes to (3, R, R) in [0, 1].
    for example in &folder.examples {
        let image = load_square(&example.path, 16, &Device::Cpu).unwrap();
        assert_eq!(image.dims(), [3, 16, 16]);
        let values: Vec<f32> = image.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_caption_for_all_or_uncaptioned_images_fail_or_skip_as_chosen() {
    let dir = temp_dir("captions");
    for name in ["a.png", "b.png"] {
        DynamicImage::ImageLuma8(ImageBuffer::from_pixel(8, 8, Luma([100u8])))
            .save(dir.join(name))
            .unwrap();
    }
    write(&dir.join("a.txt"), "an image with a caption");
    let err = ImageFolder::scan(&dir, &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("b.png") && err.contains("--caption"), "{err}");

    let skip = FolderOptions {
        missing_caption: MissingCaption::Skip,
        ..Default::default()
    };
    let folder = ImageFolder::scan(&dir, &skip).unwrap();
    assert_eq!(folder.examples.len(), 1);
    assert_eq!(reason_for(&folder, "b.png"), "no caption");

    let instance = FolderOptions {
        caption: Some("a photo of sks dog".into()),
        ..Default::default()
    };
    let folder = ImageFolder::scan(&dir, &instance).unwrap();
    assert_eq!(folder.examples.len(), 2);
    assert!(folder
        .examples
        .iter()
        .all(|e| e.caption == "a photo of sks dog"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn metadata_naming_missing_or_outside_files_stops_the_scan() {
    let outside = temp_dir("outside-target");
    DynamicImage::ImageLuma8(ImageBuffer::from_pixel(8, 8, Luma([1u8])))
        .save(outside.join("secret.png"))
        .unwrap();
    let secret = outside.join("secret.png").display().to_string();
    let cases = [
        ("missing.png", "no such file"),
        ("../outside.png", "outside the folder"),
        (secret.as_str(), "outside the folder"),
    ];
    for (index, (file_name, expected)) in cases.into_iter().enumerate() {
        let dir = temp_dir(&format!("meta{index}"));
        DynamicImage::ImageLuma8(ImageBuffer::from_pixel(8, 8, Luma([1u8])))
            .save(dir.join("ok.png"))
            .unwrap();
        let line = serde_json::json!({"file_name": file_name, "text": "x"}).to_string();
        write(
            &dir.join("metadata.jsonl"),
            &format!("{{\"file_name\": \"ok.png\", \"text\": \"fine\"}}\n{line}\n"),
        );
        let err = ImageFolder::scan(&dir, &FolderOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metadata.jsonl") && err.contains("line 2"),
            "{err}"
        );
        assert!(err.contains(expected), "{file_name}: {err}");
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&outside).ok();
}

#[test]
fn empty_or_unusable_folders_are_refused_by_name() {
    let dir = temp_dir("empty");
    let err = ImageFolder::scan(&dir, &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(dir.to_str().unwrap()) && err.contains("no images"),
        "{err}"
    );
    write(&dir.join("bad.jpg"), "not a jpeg");
    write(&dir.join("bad.txt"), "caption");
    let err = ImageFolder::scan(&dir, &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no usable images") && err.contains("bad.jpg"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn square_crop_keeps_the_centre_of_a_wide_image() {
    let dir = temp_dir("crop");
    // 4 columns of 16 pixels: black, white, white, black. The centre square is the two white
    // columns.
    let wide = ImageBuffer::from_fn(64, 32, |x, _| {
        Luma([if (16..48).contains(&x) { 255u8 } else { 0 }])
    });
    let path = dir.join("wide.png");
    DynamicImage::ImageLuma8(wide).save(&path).unwrap();
    let image = load_square(&path, 16, &Device::Cpu).unwrap();
    let mean: f32 = image.mean_all().unwrap().to_scalar().unwrap();
    assert!(mean > 0.95, "the centre is white: mean {mean}");
    let channels: Vec<Vec<f32>> = (0..3)
        .map(|c| {
            image
                .get(c)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    assert_eq!(channels[0], channels[1], "gray becomes equal RGB");
    assert_eq!(channels[1], channels[2]);
    std::fs::remove_dir_all(&dir).ok();
}
