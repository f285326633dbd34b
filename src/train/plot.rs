//! The loss log (a CSV) and its curve as a PNG (plotters; no font backend is compiled in, so the chart carries a
//! grid but no axis labels: the CSV beside it holds the numbers).

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Draws `points` (step, loss) on a log-scaled loss axis, written atomically to `path`.
pub fn loss_curve_png(points: &[(usize, f64)], path: &Path) -> Result<()> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .map(|(s, l)| (*s as f64, l.log10()))
        .collect();
    if finite.len() < 2 {
        return Ok(());
    }
    let tmp = path.with_extension("partial.png");
    let draw_error = |e: &dyn std::fmt::Display| Error::File {
        path: path.display().to_string(),
        message: format!("could not draw the loss curve: {e}"),
    };
    {
        let root = BitMapBackend::new(&tmp, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(&e))?;
        let (x_max, _) = finite.last().copied().unwrap_or((1.0, 0.0));
        let y_min = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let y_max = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((y_max - y_min) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .build_cartesian_2d(0.0..x_max.max(1.0), (y_min - pad)..(y_max + pad))
            .map_err(|e| draw_error(&e))?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(8)
            .disable_x_mesh()
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|_| String::new())
            .draw()
            .map_err(|e| draw_error(&e))?;
        chart
            .draw_series(LineSeries::new(finite, &BLUE))
            .map_err(|e| draw_error(&e))?;
        root.present().map_err(|e| draw_error(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| draw_error(&e))
}

/// Keeps the CSV rows of steps up to `step` (a resumed run rewrites what came after its
/// checkpoint, so the log never holds two rows for one step).
pub fn trim_csv(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.split(',')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .is_none_or(|s| s <= step)
        })
        .collect();
    crate::checkpoint::write_atomically(path, (kept.join("\n") + "\n").as_bytes())?;
    Ok(())
}

/// (step, loss) pairs of a loss CSV (step first, loss second), for the curve.
pub fn read_losses(path: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(',');
            let step = fields.next()?.parse().ok()?;
            let loss = fields.next()?.parse().ok()?;
            Some((step, loss))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_curve_png() {
        let path = std::env::temp_dir().join(format!("diffuse-loss-{}.png", std::process::id()));
        let points: Vec<(usize, f64)> = (1..200).map(|s| (s, 1.0 / s as f64)).collect();
        loss_curve_png(&points, &path).unwrap();
        let image = image::open(&path).unwrap();
        assert_eq!((image.width(), image.height()), (640, 360));
        // Not blank: the curve's blue pixels are there.
        let rgb = image.to_rgb8();
        assert!(rgb.pixels().any(|p| p.0[2] > 200 && p.0[0] < 80));
        std::fs::remove_file(&path).unwrap();
    }
}
