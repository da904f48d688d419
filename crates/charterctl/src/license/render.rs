//! What `charterctl license` prints without `--json`: the stored licenses as a table, and
//! the status and report as aligned `name  value` lines. Pure functions of the API's JSON
//! and the day, so they are tested without a control plane.

use charter_license::{rfc3339, LicenseDocument, Terms, EXPIRING_DAYS, GRACE_DAYS};
use serde_json::Value;
use time::Date;

/// The columns of the licenses table.
const HEADER: [&str; 6] = [
    "ID",
    "CUSTOMER",
    "STATUS",
    "EXPIRES",
    "DAYS LEFT",
    "UPDATED",
];

/// What is shown for a value the answer does not have.
const NONE: &str = "-";

/// The licenses table: one row per admin API record, in the order given. The status is
/// judged from the payload's dates on `today` (the signature is the control plane's to
/// check); the license with id `in_force` is marked `(in force)`.
pub fn records_table(records: &[Value], today: Date, in_force: Option<&str>) -> String {
    let mut rows = vec![HEADER.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for record in records {
        rows.push(record_row(record, today, in_force));
    }
    aligned(&rows)
}

fn record_row(record: &Value, today: Date, in_force: Option<&str>) -> Vec<String> {
    let id = text(&record["id"]);
    let updated = record["updated_at"]
        .as_i64()
        .map_or_else(|| text(&record["updated_at"]), rfc3339);
    let document = match record["payload"].as_str() {
        Some(payload) => LicenseDocument::parse(payload),
        None => LicenseDocument::parse(""),
    };
    let (customer, mut status, expires, days_left) = match document {
        Err(e) => (
            NONE.to_owned(),
            e.code.to_string(),
            NONE.to_owned(),
            NONE.to_owned(),
        ),
        Ok(document) => {
            let customer = document.field("customer").unwrap_or(NONE).to_owned();
            match document.terms() {
                Err(e) => (
                    customer,
                    e.code.to_string(),
                    NONE.to_owned(),
                    NONE.to_owned(),
                ),
                Ok(terms) => {
                    let days_left = (terms.expiration_date - today).whole_days();
                    (
                        customer,
                        judge(&terms, today).to_owned(),
                        terms.expiration_date.to_string(),
                        days_left.to_string(),
                    )
                }
            }
        }
    };
    if in_force.is_some_and(|in_force| in_force == id) {
        status.push_str(" (in force)");
    }
    vec![id, customer, status, expires, days_left, updated]
}

/// The status a node would give these terms on `today` (DESIGN's table), for a license
/// whose signature verifies; a creation date still to come is refused as nodes refuse it.
pub fn judge(terms: &Terms, today: Date) -> &'static str {
    if terms.creation_date > today {
        return "invalid_expiration_date";
    }
    let days_left = (terms.expiration_date - today).whole_days();
    if days_left > EXPIRING_DAYS {
        "valid"
    } else if days_left >= 0 {
        "expiring"
    } else if -days_left <= GRACE_DAYS {
        "grace"
    } else {
        "expired"
    }
}

/// `GET /license/status` as lines: the status, where the license in force comes from, its
/// fields (never the raw license key), and every warning.
pub fn status_text(status: &Value) -> String {
    let mut pairs = vec![("status", text(&status["status"]))];
    let license = &status["license"];
    if license.is_object() {
        pairs.push(("source", text(&status["source"])));
        pairs.push(("id", text(&license["id"])));
        pairs.push(("customer", text(&license["customer"])));
        pairs.push(("product", text(&license["product_subscription"])));
        let expires = text(&license["license_expiration_date"]);
        pairs.push((
            "expires",
            match license["days_left"].as_i64() {
                Some(days) if days >= 0 => format!("{expires} ({days} days left)"),
                Some(days) => format!("{expires} ({} days ago)", -days),
                None => expires,
            },
        ));
        pairs.push(("data planes", text(&license["dataplanes"])));
        pairs.push(("key id", text(&license["key_id"])));
        pairs.push((
            "updated",
            license["updated_at"]
                .as_i64()
                .map_or_else(|| text(&license["updated_at"]), rfc3339),
        ));
    }
    for warning in status["warnings"].as_array().into_iter().flatten() {
        pairs.push(("warning", text(warning)));
    }
    pairs_text(&pairs)
}

/// `GET /license/report` as lines, then the request counters per month (and per data plane
/// when the report has them).
pub fn report_text(report: &Value) -> String {
    let system = &report["system_info"];
    let pairs = vec![
        ("license key", text(&report["license_key"])),
        ("licensed data planes", text(&report["licensed_dataplanes"])),
        (
            "connected data planes",
            text(&report["deployment_info"]["connected_dp_count"]),
        ),
        ("services", text(&report["services_count"])),
        ("admin tokens", text(&report["rbac_users"])),
        (
            "version",
            format!(
                "{} ({})",
                text(&report["kong_version"]),
                text(&report["db_version"])
            ),
        ),
        (
            "system",
            format!(
                "{}, {} cores, host {}",
                text(&system["uname"]),
                text(&system["cores"]),
                text(&system["hostname"])
            ),
        ),
    ];
    let mut out = pairs_text(&pairs);
    out.push('\n');
    let mut months = vec![vec!["MONTH".to_owned(), "REQUESTS".to_owned()]];
    for counter in report["counters"].as_array().into_iter().flatten() {
        months.push(vec![
            text(&counter["bucket"]),
            text(&counter["request_count"]),
        ]);
    }
    out.push_str(&aligned(&months));
    if let Some(planes) = report["dataplanes"].as_array() {
        out.push('\n');
        let mut rows = vec![vec![
            "DATA PLANE".to_owned(),
            "MONTH".to_owned(),
            "REQUESTS".to_owned(),
        ]];
        for plane in planes {
            for counter in plane["counters"].as_array().into_iter().flatten() {
                rows.push(vec![
                    text(&plane["id"]),
                    text(&counter["bucket"]),
                    text(&counter["request_count"]),
                ]);
            }
        }
        out.push_str(&aligned(&rows));
    }
    out
}

/// A JSON value as a table cell: strings as they are, `null` or absent as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => NONE.to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as columns two spaces apart, each as wide as its widest cell (the last one not
/// padded), one line per row.
fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `name  value` lines with the values aligned.
fn pairs_text(pairs: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|(name, value)| vec![(*name).to_owned(), value.clone()])
        .collect();
    aligned(&rows)
}
