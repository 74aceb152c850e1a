//! bench.svg: TCP_CRR latency and new-connection rate against Service count, a line per mode.
use std::{collections::BTreeMap, path::Path};

use anyhow::anyhow;
use plotters::prelude::*;

use super::report::Row;

const COLORS: [RGBColor; 6] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];

pub fn draw(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, "TCP_CRR p50 (µs)", &series(rows, |r| r.tcp_crr.p50))?;
    panel(
        &right,
        "new connections per second",
        &series(rows, |r| r.tcp_crr.rate),
    )?;
    root.present().map_err(|e| anyhow!("{e}"))
}

/// (Service count, figure) per mode, in the order modes first appear.
fn series(rows: &[Row], figure: impl Fn(&Row) -> f64) -> Vec<(&'static str, Vec<(f64, f64)>)> {
    let mut order = Vec::new();
    let mut points: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for row in rows {
        if !points.contains_key(row.mode) {
            order.push(row.mode);
        }
        points
            .entry(row.mode)
            .or_default()
            .push((row.services as f64, figure(row)));
    }
    order
        .into_iter()
        .map(|mode| {
            let mut line = points.remove(mode).unwrap_or_default();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            (mode, line)
        })
        .collect()
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let all = || series.iter().flat_map(|(_, line)| line.iter());
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        // Half a decade of room on either side, so one scale still spans an axis.
        .build_cartesian_2d((0.5..x_max * 2.0).log_scale(), 0.0..y_max * 1.15)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("Services")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (mode, line)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(*mode)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::{super::report::tests::row, *};

    #[test]
    fn a_line_per_mode_sorted_by_services() {
        let rows = [
            row(1000, "no-nat", 3.0),
            row(1000, "node-agent", 4.0),
            row(1, "no-nat", 1.0),
            row(1, "node-agent", 2.0),
        ];
        assert_eq!(
            series(&rows, |r| r.tcp_crr.p50),
            [
                ("no-nat", vec![(1.0, 1.0), (1000.0, 3.0)]),
                ("node-agent", vec![(1.0, 2.0), (1000.0, 4.0)])
            ]
        );
    }

    #[test]
    fn draws_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        draw(&[row(1, "no-nat", 170.0), row(100, "no-nat", 175.0)], &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(svg.contains("no-nat") && svg.contains("Services"));
    }
}
