//! Results of `anomos bench`: rows with their targets, medians and spreads, and their output as a table or JSON.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) enum Cmp {
    AtLeast,
    AtMost,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub(super) cmp: Cmp,
    pub(super) value: f64,
}

impl Target {
    pub(super) fn met(&self, v: f64) -> bool {
        match self.cmp {
            Cmp::AtLeast => v >= self.value,
            Cmp::AtMost => v <= self.value,
        }
    }
    pub(super) fn text(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtLeast => "≥",
            Cmp::AtMost => "≤",
        };
        format!("{op} {} {unit}", fmt_num(self.value))
    }
}

pub(super) fn at_least(value: f64) -> Option<Target> {
    Some(Target { cmp: Cmp::AtLeast, value })
}

pub(super) fn at_most(value: f64) -> Option<Target> {
    Some(Target { cmp: Cmp::AtMost, value })
}

/// One line of the table: a figure, its value in each run, and its target.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) key: String,
    pub(super) name: String,
    pub(super) unit: &'static str,
    pub(super) values: Vec<f64>,
    pub(super) target: Option<Target>,
}

impl Row {
    pub(super) fn median(&self) -> f64 {
        median(&self.values)
    }
    pub(super) fn pass(&self) -> Option<bool> {
        match (self.target, self.values.is_empty()) {
            (Some(t), false) => Some(t.met(self.median())),
            _ => None,
        }
    }
}

#[derive(Default)]
pub(super) struct Report {
    pub(super) rows: Vec<Row>,
    /// Context numbers (bounds, components of a figure), by key.
    pub(super) info: Vec<(String, f64)>,
    pub(super) notes: Vec<String>,
}

impl Report {
    // Bounds: `i` is a position just found in `rows`, and `n - 1` indexes the row just pushed (so n >= 1).
    #[allow(clippy::indexing_slicing)]
    pub(super) fn row(&mut self, key: &str, name: &str, unit: &'static str, target: Option<Target>) -> &mut Row {
        if let Some(i) = self.rows.iter().position(|r| r.key == key) {
            return &mut self.rows[i];
        }
        self.rows.push(Row { key: key.into(), name: name.into(), unit, values: Vec::new(), target });
        let n = self.rows.len();
        &mut self.rows[n - 1]
    }

    pub(super) fn add(&mut self, key: &str, name: &str, unit: &'static str, target: Option<Target>, v: f64) {
        if v.is_finite() {
            self.row(key, name, unit, target).values.push(v);
        }
    }

    pub(super) fn info(&mut self, key: &str, v: f64) {
        self.info.push((key.into(), v));
    }

    pub(super) fn merge(&mut self, other: Report) {
        for r in other.rows {
            let row = self.row(&r.key, &r.name, r.unit, r.target);
            row.values.extend(r.values);
        }
        self.info.extend(other.info);
        self.notes.extend(other.notes);
    }

    pub(super) fn median_of(&self, key: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.key == key).filter(|r| !r.values.is_empty()).map(Row::median)
    }
}

pub(super) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let hi = s.get(n / 2).copied().unwrap_or(f64::NAN);
    if n % 2 == 1 {
        hi
    } else {
        (s.get(n / 2 - 1).copied().unwrap_or(f64::NAN) + hi) / 2.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100).
pub(super) fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s.get(rank.min(s.len()) - 1).copied().unwrap_or(f64::NAN)
}

pub(super) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(super) fn print_table(rep: &Report, plan: &Plan, load: (&str, &str), elapsed: Duration) {
    println!(
        "anomos bench{}: {} runs per figure, {} cores, load average {} (start) / {} (end), {:.0} s",
        if plan.quick { " --quick" } else { "" },
        plan.runs,
        cores(),
        load.0,
        load.1,
        elapsed.as_secs_f64()
    );
    let w = rep.rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(10).max(10);
    println!("| {:<w$} | {:>9} | {:>19} | {:<15} | {:<4} |", "figure", "median", "spread (min–max)", "target", "");
    println!("|{}|{}|{}|{}|{}|", "-".repeat(w + 2), "-".repeat(11), "-".repeat(21), "-".repeat(17), "-".repeat(6));
    for r in &rep.rows {
        let (lo, hi) = r.values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
        let spread = if r.values.len() > 1 { format!("{}–{}", fmt_num(lo), fmt_num(hi)) } else { String::new() };
        let target = r.target.map(|t| t.text(r.unit)).unwrap_or_default();
        let mark = match r.pass() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "| {:<w$} | {:>9} | {:>19} | {:<15} | {:<4} |",
            r.name,
            format!("{} {}", fmt_num(r.median()), r.unit),
            spread,
            target,
            mark
        );
    }
    if !rep.info.is_empty() {
        let items: Vec<String> = rep.info.iter().map(|(k, v)| format!("{k}={}", fmt_num(*v))).collect();
        println!("context: {}", items.join(" "));
    }
    for n in &rep.notes {
        println!("note: {n}");
    }
}

pub(super) fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(super) fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

pub(super) fn print_json(rep: &Report, plan: &Plan, load: (&str, &str), elapsed: Duration) {
    let mut o = String::from("{");
    let _ = write!(
        o,
        "\"quick\":{},\"runs\":{},\"cores\":{},\"load_start\":{},\"load_end\":{},\"elapsed_s\":{},\"rows\":[",
        plan.quick,
        plan.runs,
        cores(),
        json_str(load.0),
        json_str(load.1),
        json_num(elapsed.as_secs_f64())
    );
    for (i, r) in rep.rows.iter().enumerate() {
        let (lo, hi) = r.values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
        let values: Vec<String> = r.values.iter().map(|v| json_num(*v)).collect();
        let target = match r.target {
            Some(t) => format!(
                "{{\"op\":{},\"value\":{}}}",
                json_str(match t.cmp {
                    Cmp::AtLeast => ">=",
                    Cmp::AtMost => "<=",
                }),
                json_num(t.value)
            ),
            None => "null".into(),
        };
        let pass = r.pass().map(|p| p.to_string()).unwrap_or_else(|| "null".into());
        let _ = write!(
            o,
            "{}{{\"key\":{},\"name\":{},\"unit\":{},\"median\":{},\"min\":{},\"max\":{},\"values\":[{}],\"target\":{},\"pass\":{}}}",
            if i > 0 { "," } else { "" },
            json_str(&r.key),
            json_str(r.name.trim_start()),
            json_str(r.unit),
            json_num(r.median()),
            json_num(lo),
            json_num(hi),
            values.join(","),
            target,
            pass
        );
    }
    o.push_str("],\"context\":{");
    let info: Vec<String> = rep.info.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_num(*v))).collect();
    o.push_str(&info.join(","));
    o.push_str("},\"notes\":[");
    let notes: Vec<String> = rep.notes.iter().map(|n| json_str(n)).collect();
    o.push_str(&notes.join(","));
    o.push_str("]}");
    println!("{o}");
}
