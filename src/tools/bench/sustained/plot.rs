//! `bench --sustained --plot FILE.svg`: p50 and p99 latency against the offered rate, for the
//! worker and the broker-only pipeline, with the p99 bound drawn. Drawn with `plotters`' SVG
//! backend (text as SVG `<text>`, so no font files are read).

use std::path::Path;

use plotters::prelude::*;

use super::step::Step;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PlotError {
    #[error("drawing the plot: {0}")]
    Draw(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// One line of the plot: (offered msgs/s, latency ms), by rate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Per point: whether its step held the rate (drawn filled; failed steps hollow).
    pub held: Vec<bool>,
    /// p99 lines are solid and bold; p50 lines thin.
    pub p99: bool,
    /// 0: worker, 1: broker.
    pub pipeline: usize,
}

impl Series {
    /// Worker blue, broker green; p99 bold, p50 thin and lighter.
    fn style(&self) -> ShapeStyle {
        let color = if self.pipeline == 0 {
            BLUE
        } else {
            RGBColor(0, 150, 60)
        };
        if self.p99 {
            color.stroke_width(2)
        } else {
            color.mix(0.6).stroke_width(1)
        }
    }
}

/// What the plot shows, with its axes' ranges (both logarithmic).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlotData {
    pub series: Vec<Series>,
    pub bound_ms: f64,
    pub x: (f64, f64),
    pub y: (f64, f64),
}

/// Latencies below this are drawn at it (a logarithmic axis has no 0).
const FLOOR_MS: f64 = 0.1;

impl PlotData {
    pub(crate) fn new(worker: &[Step], broker: &[Step], bound_ms: f64) -> PlotData {
        let mut series = Vec::new();
        for (pipeline, (name, steps)) in [("worker", worker), ("broker-only", broker)]
            .into_iter()
            .enumerate()
        {
            for p99 in [true, false] {
                let mut measured: Vec<(f64, f64, bool)> = steps
                    .iter()
                    .filter_map(|s| {
                        let ms = if p99 { s.p99_ms } else { s.p50_ms };
                        ms.is_finite()
                            .then_some((s.offered_msgs_per_s, ms.max(FLOOR_MS), s.held))
                    })
                    .collect();
                measured.sort_by(|a, b| a.0.total_cmp(&b.0));
                series.push(Series {
                    label: format!("{name} {}", if p99 { "p99" } else { "p50" }),
                    points: measured.iter().map(|&(x, y, _)| (x, y)).collect(),
                    held: measured.iter().map(|m| m.2).collect(),
                    p99,
                    pipeline,
                });
            }
        }
        let all = || series.iter().flat_map(|s| s.points.iter());
        let (xs, ys) = (all().map(|p| p.0), all().map(|p| p.1));
        let x = span(xs, None);
        let y = span(ys, Some(bound_ms.max(FLOOR_MS)));
        PlotData {
            series,
            bound_ms,
            x,
            y,
        }
    }

    /// The plot as an SVG document.
    pub(crate) fn svg(&self) -> Result<String, PlotError> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (960, 600)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| PlotError::Draw(e.to_string()))?;
            root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
        }
        Ok(out)
    }

    pub(crate) fn write(&self, path: &Path) -> Result<(), PlotError> {
        let svg = self.svg()?;
        std::fs::write(path, svg).map_err(|source| PlotError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(
                "publish → balance.changed latency vs offered rate",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (self.x.0..self.x.1)
                    .log_scale()
                    .with_key_points(log_ticks(self.x)),
                (self.y.0..self.y.1)
                    .log_scale()
                    .with_key_points(log_ticks(self.y)),
            )?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .x_desc("offered rate, msgs/s (open loop); filled: step held, hollow: failed")
            .y_desc("latency, ms")
            .draw()?;
        for s in &self.series {
            let style = s.style();
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))?
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            let size = if s.p99 { 4 } else { 3 };
            chart.draw_series(s.points.iter().zip(&s.held).map(|(&c, &held)| {
                let st = if held { style.filled() } else { style };
                EmptyElement::at(c) + Circle::new((0, 0), size, st)
            }))?;
        }
        let bound = RED.stroke_width(1);
        chart
            .draw_series(LineSeries::new(
                [(self.x.0, self.bound_ms), (self.x.1, self.bound_ms)],
                bound,
            ))?
            .label(format!("p99 bound {} ms", self.bound_ms))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], bound));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

/// Ticks at 1, 2, 3 and 5 × each power of ten within `range` (a range within one decade
/// still gets labels).
fn log_ticks(range: (f64, f64)) -> Vec<f64> {
    let (lo, hi) = range;
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return Vec::new();
    }
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let t = m * decade;
            if (lo..=hi).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// An axis label: at most two decimals, none when whole.
fn tick(v: f64) -> String {
    format!("{}", (v * 100.0).round() / 100.0)
}

/// A logarithmic axis' range around `values` (and `include`): a little below the smallest,
/// a little above the largest, never empty.
fn span(values: impl Iterator<Item = f64>, include: Option<f64>) -> (f64, f64) {
    let (lo, hi) = values
        .chain(include)
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi <= 0.0 {
        return (1.0, 10.0);
    }
    (lo / 1.5, hi * 1.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(rate: f64, p50: f64, p99: f64) -> Step {
        Step {
            offered_msgs_per_s: rate,
            messages: 10,
            executions: 10,
            delivered_msgs_per_s: rate,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: p99,
            stopped_early: false,
            held: p99 <= 100.0,
        }
    }

    #[test]
    fn series_are_sorted_by_rate_and_floored_for_the_log_axis() {
        let worker = [
            step(2000.0, 20.0, 400.0),
            step(500.0, 0.0, 8.0),
            step(1000.0, 5.0, 30.0),
        ];
        let broker = [step(4000.0, 2.0, 9.0), step(8000.0, f64::NAN, f64::NAN)];
        let d = PlotData::new(&worker, &broker, 100.0);
        let labels: Vec<&str> = d.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "worker p99",
                "worker p50",
                "broker-only p99",
                "broker-only p50"
            ]
        );
        assert_eq!(
            d.series[0].points,
            vec![(500.0, 8.0), (1000.0, 30.0), (2000.0, 400.0)]
        );
        assert_eq!(d.series[0].held, vec![true, true, false]);
        assert_eq!(d.series[1].points[0], (500.0, FLOOR_MS));
        // A step without a measurement is left out.
        assert_eq!(d.series[2].points, vec![(4000.0, 9.0)]);
        assert_eq!(d.x, (500.0 / 1.5, 4000.0 * 1.5));
        assert_eq!(d.y, (FLOOR_MS / 1.5, 400.0 * 1.5));
    }

    #[test]
    fn log_ticks_label_every_range() {
        assert_eq!(log_ticks((167.0, 750.0)), vec![200.0, 300.0, 500.0]);
        assert_eq!(
            log_ticks((0.07, 40.0)),
            vec![
                0.1,
                0.2,
                0.30000000000000004,
                0.5,
                1.0,
                2.0,
                3.0,
                5.0,
                10.0,
                20.0,
                30.0
            ]
        );
        assert!(log_ticks((0.0, 10.0)).is_empty());
        assert!(log_ticks((5.0, 5.0)).is_empty());
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(100.0), "100");
        assert_eq!(tick(2500.0), "2500");
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(0.066666), "0.07");
    }

    #[test]
    fn the_bound_is_always_inside_the_latency_axis() {
        let d = PlotData::new(&[step(100.0, 1.0, 2.0)], &[], 100.0);
        assert!(d.y.0 < 1.0 && d.y.1 > 100.0, "{:?}", d.y);
        let empty = PlotData::new(&[], &[], 100.0);
        assert!(empty.x.0 < empty.x.1);
        assert!(empty.y.1 > 100.0);
    }

    #[test]
    fn the_svg_has_every_series_and_the_bound() {
        let d = PlotData::new(
            &[step(500.0, 3.0, 12.0), step(1000.0, 9.0, 250.0)],
            &[step(1000.0, 1.0, 4.0)],
            100.0,
        );
        let svg = d.svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for label in [
            "worker p99",
            "worker p50",
            "broker-only p99",
            "p99 bound 100 ms",
        ] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
