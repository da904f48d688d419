//! `charterctl license`: a client of a running control plane's admin API, as `consul
//! license get|put` and `nomad license get` are of theirs: list, get, add, replace and
//! delete stored licenses, and read the license status and the usage report.

mod client;
mod render;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use charter_license::{utc_date, Clock};
use charter_runtime::SystemClock;
use clap::Subcommand;
use serde_json::{json, Value};

use client::{base_url, id_segment, Answer, Client, Failure, FailureKind, Token, TOKEN_ENV};

/// The exit codes, shown under `charterctl license --help` and in the README.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the control plane refused the request (400: a license that does not validate, an id that is not a UUID)
  2  a local error (a bad flag, an unreadable FILE or token file, a bad --admin-url)
  3  the admin API could not be reached (connection refused, unknown host, timeout)
  4  401: no token, or a token the control plane does not accept
  5  403: a read token used for a write
  6  404: no license with that id
  7  409: that license is already stored
  8  any other answer (5xx, 405, 413, a redirect, a body that is not the API's JSON)";

/// `charterctl license ...`.
#[derive(clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// The control plane's admin API.
    #[arg(
        long,
        env = "CHARTER_ADMIN_URL",
        default_value = "http://127.0.0.1:8001",
        global = true
    )]
    admin_url: String,
    /// A file holding the admin token, sent as `Kong-Admin-Token`. Without it, the
    /// environment variable CHARTER_ADMIN_TOKEN holds the token itself.
    #[arg(long, env = "CHARTER_ADMIN_TOKEN_FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// Print the API's JSON as returned instead of a table (`list`: every page's records in
    /// one `{"data":[...],"next":null}`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the stored licenses (GET /licenses, following `next` page by page).
    List {
        /// Licenses per request (the API's `size`, 1 to 1000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        page_size: u16,
    },
    /// Show one stored license (GET /licenses/ID).
    Get {
        /// The license id (a UUID).
        id: String,
    },
    /// Add a license (POST /licenses).
    Add {
        /// The license document, or an admin-API record holding one (`-` for standard input).
        file: PathBuf,
    },
    /// Replace the license with this id, or store it under this id (PUT /licenses/ID).
    Replace {
        /// The license id (a UUID).
        id: String,
        /// The license document, or an admin-API record holding one (`-` for standard input).
        file: PathBuf,
    },
    /// Delete a stored license (DELETE /licenses/ID; as in Kong's API, an id that is not
    /// stored also succeeds).
    Delete {
        /// The license id (a UUID).
        id: String,
    },
    /// The license in force on the control plane, and its warnings (GET /license/status).
    Status,
    /// The usage report (GET /license/report).
    Report {
        /// Also count requests per data plane (`?by=dataplane`).
        #[arg(long)]
        by_dataplane: bool,
    },
}

/// Runs one `charterctl license` command. A request that fails returns a [`Failure`],
/// whose kind gives the exit code ([`exit_code`]).
pub fn run(args: Args) -> Result<()> {
    let base = base_url(&args.admin_url)?;
    let token = Token::load(
        args.admin_token_file.as_deref(),
        std::env::var(TOKEN_ENV).ok(),
    )?;
    let client = Client::new(base, token);
    let json = args.json;
    match args.command {
        Command::List { page_size } => list(&client, page_size, json),
        Command::Get { id } => {
            let answer = client.get(&format!("/licenses/{}", id_segment(&id)?))?;
            print_record(&client, &answer, json)
        }
        Command::Add { file } => {
            let body = json!({ "payload": license_text(&file)? });
            let answer = client.send("POST", "/licenses", Some(&body))?;
            print_record(&client, &answer, json)
        }
        Command::Replace { id, file } => {
            let path = format!("/licenses/{}", id_segment(&id)?);
            let body = json!({ "payload": license_text(&file)? });
            let answer = client.send("PUT", &path, Some(&body))?;
            print_record(&client, &answer, json)
        }
        Command::Delete { id } => {
            client.send("DELETE", &format!("/licenses/{}", id_segment(&id)?), None)?;
            // A 204 has no body, so `--json` prints nothing: the exit code says it all.
            if !json {
                emit(&format!("deleted license {id}\n"))?;
            }
            Ok(())
        }
        Command::Status => {
            let answer = client.get("/license/status")?;
            let value = answer.json()?;
            print_either(json, &answer, || render::status_text(&value))
        }
        Command::Report { by_dataplane } => {
            let path = if by_dataplane {
                "/license/report?by=dataplane"
            } else {
                "/license/report"
            };
            let answer = client.get(path)?;
            let value = answer.json()?;
            print_either(json, &answer, || render::report_text(&value))
        }
    }
}

/// The exit code of an error from [`run`]: a failed request's own, else 2.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error
        .downcast_ref::<Failure>()
        .map_or(2, |failure| failure.kind.exit_code())
}

/// Every stored license, page by page: `next` is a path below the admin API's base URL.
fn list(client: &Client, page_size: u16, json: bool) -> Result<()> {
    let mut path = format!("/licenses?size={page_size}");
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    loop {
        let answer = client.get(&path)?;
        let page = answer.json()?;
        let Some(data) = page.get("data").and_then(Value::as_array) else {
            return Err(not_the_api(&answer, "a list without a `data` array").into());
        };
        records.extend(data.iter().cloned());
        match page.get("next") {
            None | Some(Value::Null) => break,
            Some(Value::String(next)) if next.starts_with('/') => {
                // A server that hands out the same page again would keep us here forever.
                if !seen.insert(next.clone()) {
                    return Err(not_the_api(&answer, "a `next` page it already gave").into());
                }
                path = next.clone();
            }
            Some(other) => {
                return Err(not_the_api(&answer, &format!("`next` {other}, not a path")).into())
            }
        }
    }
    if json {
        emit(&format!("{}\n", json!({ "data": records, "next": null })))?;
    } else if records.is_empty() {
        emit(&format!("no licenses stored at {}\n", client.base()))?;
    } else {
        let in_force = in_force(client);
        emit(&render::records_table(
            &records,
            today(),
            in_force.as_deref(),
        ))?;
    }
    Ok(())
}

/// A record answer: the body as returned with `--json`, else a one-row table.
fn print_record(client: &Client, answer: &Answer, json: bool) -> Result<()> {
    let record = answer.json()?;
    if !record.is_object() {
        return Err(not_the_api(answer, "a record that is not an object").into());
    }
    if json {
        emit(&as_returned(answer))
    } else {
        let in_force = in_force(client);
        emit(&render::records_table(
            &[record],
            today(),
            in_force.as_deref(),
        ))
    }
}

/// The body as returned with `--json`, else the rendered text.
fn print_either(json: bool, answer: &Answer, rendered: impl FnOnce() -> String) -> Result<()> {
    if json {
        emit(&as_returned(answer))
    } else {
        emit(&rendered())
    }
}

/// The body as the API sent it, ending in one newline.
fn as_returned(answer: &Answer) -> String {
    format!("{}\n", answer.body.trim_end())
}

/// Writes to standard output. A reader that has gone (`charterctl license list | head`)
/// is not an error: it has all it wanted.
fn emit(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing standard output")
        }
        _ => Ok(()),
    }
}

/// The id of the stored license in force, to mark it in a table. Best effort: the table
/// is still worth printing without the mark if `/license/status` does not answer.
fn in_force(client: &Client) -> Option<String> {
    let status = client.get("/license/status").ok()?.json().ok()?;
    status["license"]["id"].as_str().map(str::to_owned)
}

/// Today's UTC date on this machine's clock.
fn today() -> time::Date {
    utc_date(SystemClock.now())
}

/// An answer that is JSON but not what the admin API sends.
fn not_the_api(answer: &Answer, what: &str) -> Failure {
    Failure::new(
        FailureKind::Other,
        format!(
            "{} answered {} with {what}; is --admin-url a Charter control plane's admin API?",
            answer.request, answer.status
        ),
    )
}

/// The license text to send as `payload`: the file as it is, or, when it is an admin-API
/// record (`{"payload":"..."}`, as `charterctl license get --json` prints), the document
/// it holds, so a saved record can be added back.
fn license_text(file: &Path) -> Result<String> {
    let text = crate::read_input(file, "license")?;
    if text.trim().is_empty() {
        bail!("license {} is empty", file.display());
    }
    Ok(payload_of(text))
}

/// The document inside a record, or the text itself.
fn payload_of(text: String) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) {
        if !map.contains_key("license") {
            if let Some(Value::String(inner)) = map.get("payload") {
                return inner.clone();
            }
        }
    }
    text
}
