//! The bench's tables, as aligned text for the terminal or as Markdown for
//! the docs: measurements (median, min..max, IQR per case and variant), the
//! ratios against issue 12's targets, the idle exits by kind, and the change
//! against an earlier run (`--compare`).

use std::collections::BTreeMap;

use super::analysis::{ratios, rows, Ratio, Row, Verdict};
use super::results::BenchResult;

/// Rows of cells under a header.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Column titles.
    pub header: Vec<String>,
    /// Cells, one `Vec` per row.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Columns padded to their widest cell.
    pub fn text(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// A GitHub-flavoured Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.header.join(" | "));
        out.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "/")).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }
}

/// A value with about three significant digits.
pub fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 || a == 0.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// One row per case and variant: samples, median, min..max, IQR.
pub fn measurements(result: &BenchResult) -> Table {
    let mut table = Table::new(&["case", "variant", "n", "median", "min..max", "IQR", "unit"]);
    let mut last_case = String::new();
    for Row {
        case,
        variant,
        unit,
        spread,
    } in rows(result)
    {
        let shown_case = if case == last_case {
            String::new()
        } else {
            case.clone()
        };
        last_case = case;
        let cells = match spread {
            Some(s) => vec![
                s.n.to_string(),
                num(s.median),
                format!("{}..{}", num(s.min), num(s.max)),
                format!("{}..{}", num(s.q1), num(s.q3)),
            ],
            None => vec!["0".into(), "-".into(), "-".into(), "-".into()],
        };
        let mut row = vec![shown_case, variant];
        row.extend(cells);
        row.push(unit);
        table.rows.push(row);
    }
    table
}

fn ratio_cells(r: &Ratio) -> Vec<String> {
    let suffix = if r.count { "" } else { "x" };
    vec![
        r.case.clone(),
        r.label.clone(),
        format!("{}{suffix}", num(r.value)),
        r.rounds
            .map(|(lo, hi)| format!("{}..{}", num(lo), num(hi)))
            .unwrap_or_else(|| "-".into()),
        r.goal_text(),
        r.verdict().word().to_string(),
    ]
}

/// Every ratio with its per-round range, target and verdict.
pub fn ratio_table(result: &BenchResult) -> Table {
    let mut table = Table::new(&["case", "ratio", "median", "per round", "target", "verdict"]);
    for r in ratios(result) {
        table.rows.push(ratio_cells(&r));
    }
    table
}

/// Counts of met and missed targets.
pub fn target_counts(result: &BenchResult) -> (usize, usize) {
    let all = ratios(result);
    let met = all.iter().filter(|r| r.verdict() == Verdict::Met).count();
    let missed = all
        .iter()
        .filter(|r| r.verdict() == Verdict::Missed)
        .count();
    (met, missed)
}

/// One idle variant's window exits and guest idle entries, summed over rounds.
#[derive(Debug, Default)]
struct IdleTotals {
    rounds: u32,
    exits: BTreeMap<String, u64>,
    psci_entries: u64,
    wfi_entries: u64,
}

/// The idle workload's window exits by kind, summed over its rounds (`trng` counts the
/// TRNG calls among the hypercalls).
pub fn idle_exits(result: &BenchResult) -> Option<Table> {
    let kinds = [
        "hypercall",
        "trng",
        "wakeup",
        "mmio_read",
        "mmio_write",
        "interrupted",
        "system_event",
        "other",
    ];
    let mut header = vec!["variant", "rounds"];
    header.extend(kinds);
    header.extend(["guest PSCI idle entries", "guest WFI entries"]);
    let mut table = Table::new(&header);
    let mut per_variant: BTreeMap<(usize, String), IdleTotals> = BTreeMap::new();
    let order = |variant: &str| {
        result
            .cases
            .iter()
            .find(|c| c.workload == "linux-idle")
            .and_then(|c| c.variants.iter().position(|v| v == variant))
            .unwrap_or(usize::MAX)
    };
    for sample in result.samples.iter().filter(|s| s.workload == "linux-idle") {
        let totals = per_variant
            .entry((order(&sample.variant), sample.variant.clone()))
            .or_default();
        totals.rounds += 1;
        let window = sample
            .detail
            .get("window_exits")
            .and_then(|w| w.as_object());
        for (kind, count) in window.into_iter().flatten() {
            *totals.exits.entry(kind.clone()).or_default() += count.as_u64().unwrap_or(0);
        }
        let get = |key: &str| sample.detail.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        totals.psci_entries += get("cpuidle_psci_entries");
        totals.wfi_entries += get("cpuidle_wfi_entries");
    }
    if per_variant.is_empty() {
        return None;
    }
    for ((_, variant), totals) in per_variant {
        let mut row = vec![variant, totals.rounds.to_string()];
        row.extend(
            kinds
                .iter()
                .map(|k| totals.exits.get(*k).copied().unwrap_or(0).to_string()),
        );
        row.extend([
            totals.psci_entries.to_string(),
            totals.wfi_entries.to_string(),
        ]);
        table.rows.push(row);
    }
    Some(table)
}

fn change(old: f64, new: f64) -> String {
    if old == 0.0 {
        return if new == 0.0 {
            "0%".into()
        } else {
            "new".into()
        };
    }
    format!("{:+.1}%", (new / old - 1.0) * 100.0)
}

/// Medians and ratios of `new` next to `old`'s, with the change.
pub fn comparison(old: &BenchResult, new: &BenchResult) -> (Table, Table) {
    let mut medians = Table::new(&["case", "variant", "old median", "new median", "change"]);
    let old_rows = rows(old);
    for row in rows(new) {
        let Some(new_spread) = row.spread else {
            continue;
        };
        let old_median = old_rows
            .iter()
            .find(|o| o.case == row.case && o.variant == row.variant)
            .and_then(|o| o.spread)
            .map(|s| s.median);
        medians.rows.push(vec![
            row.case.clone(),
            row.variant.clone(),
            old_median.map(num).unwrap_or_else(|| "-".into()),
            num(new_spread.median),
            old_median
                .map(|o| change(o, new_spread.median))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut ratio_changes = Table::new(&["case", "ratio", "old", "new", "target", "verdict now"]);
    let old_ratios = ratios(old);
    for r in ratios(new) {
        let old_value = old_ratios
            .iter()
            .find(|o| o.case == r.case && o.label == r.label)
            .map(|o| num(o.value))
            .unwrap_or_else(|| "-".into());
        ratio_changes.rows.push(vec![
            r.case.clone(),
            r.label.clone(),
            old_value,
            num(r.value),
            r.goal_text(),
            r.verdict().word().to_string(),
        ]);
    }
    (medians, ratio_changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_aligned_text_and_markdown() {
        let table = Table {
            header: vec!["a".into(), "long header".into()],
            rows: vec![vec!["wide cell".into(), "x|y".into()]],
        };
        assert_eq!(table.text(), "a          long header\nwide cell  x|y\n");
        assert_eq!(
            table.markdown(),
            "| a | long header |\n|---|---|\n| wide cell | x/y |\n"
        );
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(num(178.4), "178");
        assert_eq!(num(20.94), "20.9");
        assert_eq!(num(1.064), "1.06");
        assert_eq!(num(0.0), "0.00");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(change(100.0, 110.0), "+10.0%");
        assert_eq!(change(0.0, 0.0), "0%");
    }
}
