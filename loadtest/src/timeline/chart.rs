//! The timeline as an SVG chart (plotters, SVG backend only): four panels over the same
//! seconds-since-start axis, each with a dashed line where the load stopped sending.
//!
//! 1. events per second: offered, accepted, settled (and rejected, when any was): settled
//!    below accepted is the pipeline falling behind;
//! 2. consumer lag per group, messages: which stage the backlog is in front of;
//! 3. e2e p50 and p99 of the events settled each second;
//! 4. CPU per process, % of one core: who was busy meanwhile (and, in grey, the rest of the
//!    machine).
#![allow(clippy::float_arithmetic)] // chart coordinates

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Timeline;

const WIDTH: u32 = 1400;
const PANEL_HEIGHT: u32 = 330;

/// One line: its name, colour and per-second values (None: not measured, a gap in the line).
struct Series {
    name: String,
    color: RGBAColor,
    values: Vec<Option<f64>>,
}

/// Splits a series into the runs of consecutive measured points.
pub fn segments(values: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut run: Vec<(f64, f64)> = Vec::new();
    for (t, v) in values.iter().enumerate() {
        match v {
            Some(v) => run.push((t as f64, *v)),
            None if !run.is_empty() => out.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the timeline chart: {e}")
}

/// Writes the chart to `path`.
pub fn draw(tl: &Timeline, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH, PANEL_HEIGHT * 4)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((4, 1));
    let rgba = |c: RGBColor| c.to_rgba();
    let count = |f: fn(&super::Row) -> u64| -> Vec<Option<f64>> { tl.rows.iter().map(|r| Some(f(r) as f64)).collect() };

    let mut rates = vec![
        Series {
            name: "offered".into(),
            color: rgba(BLACK),
            values: count(|r| r.offered),
        },
        Series {
            name: "accepted (202)".into(),
            color: rgba(BLUE),
            values: count(|r| r.accepted),
        },
        Series {
            name: "settled".into(),
            color: rgba(RGBColor(0, 150, 0)),
            values: tl.rows.iter().map(|r| r.settled.map(|s| s as f64)).collect(),
        },
    ];
    if tl.rows.iter().any(|r| r.rejected > 0) {
        rates.push(Series {
            name: "rejected".into(),
            color: rgba(RED),
            values: count(|r| r.rejected),
        });
    }
    panel(&panels[0], "events per second", &rates, tl)?;

    let lag: Vec<Series> = tl
        .groups
        .iter()
        .enumerate()
        .map(|(g, name)| Series {
            name: format!("group {name}"),
            color: Palette99::pick(g + 1).to_rgba(),
            values: tl.rows.iter().map(|r| r.lag[g].map(|v| v as f64)).collect(),
        })
        .collect();
    let lag_title = if lag.iter().all(|s| s.values.iter().all(Option::is_none)) {
        "consumer lag, messages (not measured: no --kafka-brokers)"
    } else {
        "consumer lag, messages (high watermark - committed offset)"
    };
    panel(&panels[1], lag_title, &lag, tl)?;

    let e2e = vec![
        Series {
            name: "e2e p50".into(),
            color: rgba(BLUE),
            values: tl.rows.iter().map(|r| r.e2e_p50_ms).collect(),
        },
        Series {
            name: "e2e p99".into(),
            color: rgba(RED),
            values: tl.rows.iter().map(|r| r.e2e_p99_ms).collect(),
        },
    ];
    panel(
        &panels[2],
        "ms from accepted to settled, of the events settled that second",
        &e2e,
        tl,
    )?;

    let cpu: Vec<Series> = tl
        .processes
        .iter()
        .enumerate()
        .map(|(p, name)| Series {
            name: name.clone(),
            // The rest of the machine in grey: context, not a process of the pipeline.
            color: if name == super::OTHER {
                RGBColor(170, 170, 170).to_rgba()
            } else {
                Palette99::pick(p).to_rgba()
            },
            values: tl.rows.iter().map(|r| r.cpu[p]).collect(),
        })
        .collect();
    panel(&panels[3], "CPU, % of one core", &cpu, tl)?;

    root.present().map_err(err)?;
    Ok(())
}

fn panel(area: &DrawingArea<SVGBackend<'_>, Shift>, title: &str, series: &[Series], tl: &Timeline) -> Result<()> {
    let x_max = (tl.rows.len().max(2) - 1) as f64;
    // Room right of the data for the legend, so it never hides the lines' ends.
    let x_axis = x_max * 1.2 + 1.0;
    let y_max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0_f64, |m, &v| m.max(v))
        .max(1.0)
        * 1.08;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_axis, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;

    let grey = RGBColor(140, 140, 140);
    let end = tl.load_end_s.min(x_max);
    let dashes = (0..40).map(|i| {
        let y0 = y_max * f64::from(i) / 40.0;
        PathElement::new(vec![(end, y0), (end, y0 + y_max / 80.0)], grey.stroke_width(1))
    });
    chart
        .draw_series(dashes)
        .map_err(err)?
        .label("load stops")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));

    for s in series {
        let style = s.color.stroke_width(2);
        let mut labelled = false;
        for seg in segments(&s.values) {
            let drawn = chart.draw_series(LineSeries::new(seg, style)).map_err(err)?;
            if !std::mem::replace(&mut labelled, true) {
                drawn
                    .label(&s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Row;

    #[test]
    fn gaps_split_a_line() {
        assert!(segments(&[]).is_empty());
        assert!(segments(&[None, None]).is_empty());
        assert_eq!(
            segments(&[Some(1.0), Some(2.0), None, None, Some(5.0)]),
            [vec![(0.0, 1.0), (1.0, 2.0)], vec![(4.0, 5.0)]]
        );
    }

    #[test]
    fn draws_an_svg_with_every_panel_and_series() {
        let row = |t: u64, lag: Option<i64>| Row {
            t,
            offered: 1000,
            accepted: 990,
            rejected: 10,
            settled: Some(900),
            e2e_p50_ms: Some(20.0 + t as f64),
            e2e_p99_ms: Some(200.0),
            lag: vec![lag, Some(3)],
            cpu: vec![Some(50.0), None],
        };
        let tl = Timeline {
            groups: vec!["rater".into(), "ledger-writer".into()],
            processes: vec!["ingest".into(), "postgres".into()],
            load_end_s: 3.0,
            rows: (0..6).map(|t| row(t, (t != 2).then_some(100))).collect(),
        };
        let dir = std::env::temp_dir().join(format!("loadtest-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        draw(&tl, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "events per second",
            "consumer lag",
            "e2e p99",
            "CPU, % of one core",
            "group ledger-writer",
            "ingest",
            "rejected",
            "load stops",
        ] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        // A series never measured (postgres' CPU here) draws nothing, not even a legend entry.
        assert!(!svg.contains("postgres"));
        // The rater's lag has a gap at second 2: two polylines for it.
        assert!(svg.matches("<polyline").count() >= 9);
    }
}
