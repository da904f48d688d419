//! A run's report: tables of figures, printed as short aligned text, or with `--json` as
//! one JSON object holding every figure of the run (the tables, the settings and each raw
//! sample). What the figures mean is for BENCHMARKS.md to say.

use serde_json::{json, Map, Value};

use crate::harness::{cpus, Pinning};

/// The report of one run.
pub struct Report {
    json: Map<String, Value>,
    tables: Vec<Table>,
}

/// A table: a label column, then columns of numbers (units in their names).
struct Table {
    title: String,
    columns: Vec<String>,
    rows: Vec<(String, Vec<f64>)>,
}

impl Report {
    /// A report of benchmark `bench`, with the command line, its `settings` (the flags),
    /// the machine and `pinning`.
    pub fn new(bench: &str, settings: &impl serde::Serialize, pinning: &Pinning) -> Report {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
        let idle = cpuidle();
        let mut json = Map::new();
        json.insert("bench".into(), bench.into());
        json.insert(
            "command".into(),
            std::env::args().collect::<Vec<_>>().into(),
        );
        json.insert(
            "machine".into(),
            json!({ "cpus": cpus(), "cpu_model": model, "kernel": read("/proc/sys/kernel/osrelease").trim(),
                    "cpuidle": idle, "debug_build": cfg!(debug_assertions) }),
        );
        json.insert("placement".into(), pinning.describe().into());
        let settings = serde_json::to_value(settings).unwrap_or_else(|e| e.to_string().into());
        json.insert("settings".into(), settings);
        Report {
            json,
            tables: Vec::new(),
        }
    }

    /// Sets a top-level figure (settings, raw samples) of the JSON report.
    pub fn set(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_owned(), value);
    }

    /// Starts a table with `columns` separated by `|`, the first the rows' labels;
    /// [`Report::row`] adds to it.
    pub fn table(&mut self, title: impl Into<String>, columns: &str) {
        self.tables.push(Table {
            title: title.into(),
            columns: columns.split('|').map(str::to_owned).collect(),
            rows: Vec::new(),
        });
    }

    /// Adds a row to the last table; a NaN is a figure that does not apply.
    pub fn row(&mut self, label: impl Into<String>, values: impl IntoIterator<Item = f64>) {
        if let Some(table) = self.tables.last_mut() {
            table
                .rows
                .push((label.into(), values.into_iter().collect()));
        }
    }

    /// Prints the report on standard output: JSON, or text.
    pub fn print(mut self, as_json: bool) {
        if as_json {
            let tables = self.tables.iter().map(|t| {
                let rows = t.rows.iter().map(|(label, values)| {
                    let values = values
                        .iter()
                        .map(|&v| if v.is_nan() { Value::Null } else { v.into() });
                    std::iter::once(Value::from(label.as_str()))
                        .chain(values)
                        .collect::<Value>()
                });
                json!({ "title": t.title, "columns": t.columns, "rows": rows.collect::<Value>() })
            });
            self.json.insert("tables".into(), tables.collect());
            println!("{}", Value::Object(self.json));
            return;
        }
        let field = |key: &str| self.json.get(key).map(cell).unwrap_or_default();
        println!("charter-bench {}", field("bench"));
        println!("  machine:   {}", field("machine"));
        println!("  placement: {}", field("placement"));
        for table in &self.tables {
            let rows = table.rows.iter().map(|(label, values)| {
                std::iter::once(label.clone())
                    .chain(values.iter().map(|&v| cell(&v.into())))
                    .collect()
            });
            let cells: Vec<Vec<String>> =
                std::iter::once(table.columns.clone()).chain(rows).collect();
            let width = |i: usize| {
                cells
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
            };
            println!("\n{}", table.title);
            for row in &cells {
                let line = row.iter().enumerate().map(|(i, cell)| {
                    let w = width(i).unwrap_or(0);
                    if i == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                });
                println!("  {}", line.collect::<Vec<_>>().join("  ").trim_end());
            }
        }
    }
}

/// A value as a table cell: numbers to a precision that suits their size.
fn cell(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or_default();
            match x.abs() {
                a if a >= 100.0 || x.fract() == 0.0 => format!("{x:.0}"),
                a if a >= 10.0 => format!("{x:.1}"),
                _ => format!("{x:.2}"),
            }
        }
        Value::Null => "-".to_owned(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k} {}", cell(v)))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// How an idle CPU waits for work: the cpuidle driver and governor, and, with the
/// `haltpoll` governor of a virtual machine, how long it polls before halting. One that
/// does not poll halts at once and every wake-up goes through the hypervisor, which
/// one-connection latencies show (BENCHMARKS.md).
fn cpuidle() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
    let governor = match read("/sys/devices/system/cpu/cpuidle/current_governor") {
        g if g.is_empty() => read("/sys/devices/system/cpu/cpuidle/current_governor_ro"),
        g => g,
    };
    let poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
    let how = match (governor.as_str(), poll.as_str()) {
        ("", _) => String::new(),
        ("haltpoll", ns) if !ns.is_empty() => {
            format!("haltpoll governor: polls up to {ns} ns before halting")
        }
        (governor, _) => format!("{governor} governor"),
    };
    match (driver.is_empty(), how.is_empty()) {
        (_, true) => driver,
        (true, false) => how,
        (false, false) => format!("{driver} ({how})"),
    }
}
