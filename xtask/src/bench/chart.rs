//! The bench's pictures, drawn with the `svg` crate:
//! - cases: one panel per case, a bar per variant at its median, a whisker
//!   from min to max and a dot per sample (each panel has its own scale);
//! - ratios: one bar per ratio, from 1x on a log2 axis, with its per-round
//!   range and a mark at its target, green when met, red when missed, grey
//!   without a target.

use svg::node::element::{Circle, Group, Line, Rectangle, Text, Title};
use svg::Document;

use super::analysis::{ratios, spread, Goal, Verdict};
use super::results::BenchResult;
use super::table::num;

const PANEL_W: f64 = 250.0;
const PANEL_H: f64 = 170.0;
const COLUMNS: usize = 4;
const PLOT_TOP: f64 = 34.0;
const PLOT_BOTTOM: f64 = 40.0;

fn colour(variant: &str) -> &'static str {
    match variant {
        "vpsci" => "#2e86de",
        "floor" => "#95a5a6",
        "in-kernel" => "#e67e22",
        "vpsci-wfi" => "#27ae60",
        "vpsci-forwarded" => "#c0392b",
        "vpsci-kept" => "#8e44ad",
        _ => "#7f8c8d",
    }
}

fn text(content: impl Into<String>, x: f64, y: f64, anchor: &str, size: u32) -> Text {
    Text::new(content.into())
        .set("x", x)
        .set("y", y)
        .set("text-anchor", anchor)
        .set("font-size", size)
}

fn document(width: f64, height: f64, title: &str) -> Document {
    Document::new()
        .set("viewBox", (0, 0, width, height))
        .set("width", width)
        .set("height", height)
        .set("font-family", "sans-serif")
        .add(
            Rectangle::new()
                .set("width", width)
                .set("height", height)
                .set("fill", "white"),
        )
        .add(text(title, 10.0, 20.0, "start", 14).set("font-weight", "bold"))
}

/// Panels of every case's samples; `None` when nothing was measured.
pub fn cases_chart(result: &BenchResult, title: &str) -> Option<Document> {
    let cases: Vec<_> = result
        .cases
        .iter()
        .filter(|c| {
            c.variants
                .iter()
                .any(|v| !result.values(&c.workload, c.cpus, v).is_empty())
        })
        .collect();
    if cases.is_empty() {
        return None;
    }
    let rows = cases.len().div_ceil(COLUMNS);
    let width = PANEL_W * COLUMNS as f64 + 20.0;
    let height = PANEL_H * rows as f64 + 40.0;
    let mut doc = document(width, height, title);
    for (index, case) in cases.iter().enumerate() {
        let x0 = 10.0 + PANEL_W * (index % COLUMNS) as f64;
        let y0 = 30.0 + PANEL_H * (index / COLUMNS) as f64;
        let series: Vec<(String, Vec<f64>)> = case
            .variants
            .iter()
            .map(|v| {
                let values = result.values(&case.workload, case.cpus, v);
                (v.clone(), values.into_iter().map(|(_, x)| x).collect())
            })
            .collect();
        let top = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let plot_h = PANEL_H - PLOT_TOP - PLOT_BOTTOM;
        let base = y0 + PLOT_TOP + plot_h;
        let y = |v: f64| base - v / top * plot_h;
        let slot = (PANEL_W - 30.0) / series.len() as f64;
        let mut panel = Group::new()
            .set("class", "case")
            .add(
                Rectangle::new()
                    .set("x", x0)
                    .set("y", y0)
                    .set("width", PANEL_W - 10.0)
                    .set("height", PANEL_H - 10.0)
                    .set("fill", "none")
                    .set("stroke", "#dddddd"),
            )
            .add(text(
                format!("{} ({})", case.id(), case.unit),
                x0 + 6.0,
                y0 + 16.0,
                "start",
                12,
            ))
            .add(
                Line::new()
                    .set("x1", x0 + 10.0)
                    .set("x2", x0 + PANEL_W - 20.0)
                    .set("y1", base)
                    .set("y2", base)
                    .set("stroke", "#555555"),
            );
        // Four variant names do not fit side by side: stagger them.
        let stagger = series.len() > 3;
        for (i, (variant, values)) in series.iter().enumerate() {
            let cx = x0 + 15.0 + slot * (i as f64 + 0.5);
            let label_y = base + if stagger && i % 2 == 1 { 22.0 } else { 12.0 };
            panel = panel.add(text(variant.clone(), cx, label_y, "middle", 10));
            let Some(s) = spread(values) else {
                panel = panel.add(text("no data", cx, base - 4.0, "middle", 10));
                continue;
            };
            let bar_w = (slot * 0.6).min(50.0);
            panel = panel
                .add(
                    Rectangle::new()
                        .set("x", cx - bar_w / 2.0)
                        .set("y", y(s.median))
                        .set("width", bar_w)
                        .set("height", (base - y(s.median)).max(0.5))
                        .set("fill", colour(variant))
                        .set("fill-opacity", 0.75)
                        .add(Title::new(format!(
                            "{variant}: median {}, min {}, max {}, n {}",
                            num(s.median),
                            num(s.min),
                            num(s.max),
                            s.n
                        ))),
                )
                .add(
                    Line::new()
                        .set("x1", cx)
                        .set("x2", cx)
                        .set("y1", y(s.min))
                        .set("y2", y(s.max))
                        .set("stroke", "#222222"),
                )
                .add(text(
                    num(s.median),
                    cx,
                    base + if stagger { 33.0 } else { 25.0 },
                    "middle",
                    10,
                ));
            for v in values {
                panel = panel.add(
                    Circle::new()
                        .set("cx", cx + bar_w / 2.0 + 4.0)
                        .set("cy", y(*v))
                        .set("r", 1.8)
                        .set("fill", "#222222"),
                );
            }
        }
        doc = doc.add(panel);
    }
    Some(doc)
}

/// One bar per ratio against its target; `None` when there are none.
pub fn ratios_chart(result: &BenchResult, title: &str) -> Option<Document> {
    // Idle exit counts are counts, not ratios: the tables show them.
    let all: Vec<_> = ratios(result)
        .into_iter()
        .filter(|r| !r.count && r.value > 0.0)
        .collect();
    if all.is_empty() {
        return None;
    }
    const ROW: f64 = 20.0;
    const LEFT: f64 = 330.0;
    const PLOT_W: f64 = 520.0;
    // A log2 axis: 1.1x and 14x both stay readable; bars grow from 1x.
    let extremes = all.iter().flat_map(|r| {
        let target = match r.goal {
            Goal::AtMost(limit) => limit,
            _ => 1.0,
        };
        let (lo, hi) = r.rounds.unwrap_or((r.value, r.value));
        [r.value, lo.max(1e-3), hi, target]
    });
    let (min, max) = extremes.fold((1.0f64, 1.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let lo = (min.log2().floor()).min(-1.0);
    let hi = (max.log2().ceil()).max(1.0);
    let x = |v: f64| LEFT + (v.max(1e-3).log2() - lo) / (hi - lo) * PLOT_W;
    let height = 60.0 + ROW * all.len() as f64 + 30.0;
    let mut doc = document(LEFT + PLOT_W + 80.0, height, title);
    let y_end = 40.0 + ROW * all.len() as f64;
    for power in (lo as i32)..=(hi as i32) {
        let v = 2f64.powi(power);
        let tx = x(v);
        doc = doc
            .add(
                Line::new()
                    .set("x1", tx)
                    .set("x2", tx)
                    .set("y1", 36.0)
                    .set("y2", y_end)
                    .set("stroke", if power == 0 { "#555555" } else { "#eeeeee" }),
            )
            .add(text(format!("{v}x"), tx, y_end + 14.0, "middle", 10));
    }
    for (i, r) in all.iter().enumerate() {
        let y = 40.0 + ROW * i as f64;
        let fill = match r.verdict() {
            Verdict::Met => "#27ae60",
            Verdict::Missed => "#c0392b",
            Verdict::Info => "#95a5a6",
        };
        let (left, right) = (x(r.value.min(1.0)), x(r.value.max(1.0)));
        let label_at = r
            .value
            .max(r.rounds.map_or(0.0, |x| x.1))
            .max(match r.goal {
                Goal::AtMost(limit) => limit,
                _ => 0.0,
            });
        let mut row = Group::new()
            .add(text(
                format!("{}  {}", r.case, r.label),
                LEFT - 8.0,
                y + 13.0,
                "end",
                11,
            ))
            .add(
                Rectangle::new()
                    .set("x", left)
                    .set("y", y + 3.0)
                    .set("width", (right - left).max(1.0))
                    .set("height", ROW - 6.0)
                    .set("fill", fill)
                    .add(Title::new(format!(
                        "{} {}: {}x ({} target {})",
                        r.case,
                        r.label,
                        num(r.value),
                        r.verdict().word(),
                        r.goal_text()
                    ))),
            )
            .add(text(
                format!("{}x", num(r.value)),
                x(label_at) + 4.0,
                y + 13.0,
                "start",
                10,
            ));
        if let Some((lo, hi)) = r.rounds {
            row = row.add(
                Line::new()
                    .set("x1", x(lo))
                    .set("x2", x(hi))
                    .set("y1", y + ROW / 2.0)
                    .set("y2", y + ROW / 2.0)
                    .set("stroke", "#222222"),
            );
        }
        if let Goal::AtMost(limit) = r.goal {
            row = row.add(
                Line::new()
                    .set("x1", x(limit))
                    .set("x2", x(limit))
                    .set("y1", y + 1.0)
                    .set("y2", y + ROW - 1.0)
                    .set("stroke", "#000000")
                    .set("stroke-width", 2)
                    .set("stroke-dasharray", "3,2"),
            );
        }
        doc = doc.add(row);
    }
    Some(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::{Case, Sample};

    #[test]
    fn charts_draw_a_panel_per_case_and_a_bar_per_ratio() {
        let mut result = BenchResult {
            cases: vec![Case {
                workload: "bring-up".into(),
                cpus: 8,
                work: 1,
                rounds: 2,
                variants: vec!["vpsci".into(), "in-kernel".into()],
                unit: "ms".into(),
            }],
            ..BenchResult::default()
        };
        for (round, (variant, value)) in [("vpsci", 21.0), ("in-kernel", 7.0), ("vpsci", 19.0)]
            .into_iter()
            .enumerate()
        {
            result.samples.push(Sample {
                workload: "bring-up".into(),
                cpus: 8,
                variant: variant.into(),
                round: round as u32 / 2,
                value,
                unit: "ms".into(),
                work: 1,
                wall_ms: 0.0,
                exits: Default::default(),
                detail: serde_json::Value::Null,
            });
        }
        let cases = cases_chart(&result, "t").unwrap().to_string();
        assert!(cases.contains("bring-up/8 (ms)"), "{cases}");
        assert_eq!(cases.matches("<circle").count(), 3);
        let ratios = ratios_chart(&result, "t").unwrap().to_string();
        assert!(ratios.contains("vpsci / in-kernel"), "{ratios}");
        assert!(ratios.contains("#c0392b"), "3x misses its 1.1x target");
        assert!(cases_chart(&BenchResult::default(), "t").is_none());
    }
}
