//! The admin API client of `charterctl license`: one blocking HTTP/1.1 agent, the admin
//! token, and every way a request can fail mapped to its own exit code.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The header the token travels in, as Kong's admin API names it.
const TOKEN_HEADER: &str = "Kong-Admin-Token";

/// The environment variable that holds the token itself (not a file) when no
/// `--admin-token-file` is given.
pub const TOKEN_ENV: &str = "CHARTER_ADMIN_TOKEN";

/// How long to wait for a connection, and then for each read or write. The admin API
/// answers in milliseconds; a minute covers a control plane waiting out a slow disk.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest piece of a non-JSON error body quoted in a message.
const QUOTE_LIMIT: usize = 200;

/// Why a request to the admin API failed. Each kind has its own exit code, so a script
/// can tell "fix the request" from "fix the token" from "the control plane is down".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 400: a license that does not validate, an id that is not a UUID.
    Invalid,
    /// No answer at all: connection refused, unknown host, timeout, a reset.
    Unreachable,
    /// 401: no token, or one the control plane does not know.
    Unauthorized,
    /// 403: a read token on a write.
    Forbidden,
    /// 404: no such license.
    NotFound,
    /// 409: the license is already stored.
    Conflict,
    /// Any other answer: 5xx, 405, 413, a redirect, a body that is not the API's JSON.
    Other,
}

impl FailureKind {
    /// The process exit code of this failure (README, `charterctl license --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Invalid => 1,
            FailureKind::Unreachable => 3,
            FailureKind::Unauthorized => 4,
            FailureKind::Forbidden => 5,
            FailureKind::NotFound => 6,
            FailureKind::Conflict => 7,
            FailureKind::Other => 8,
        }
    }

    /// The kind of an HTTP error status.
    pub fn of_status(status: u16) -> FailureKind {
        match status {
            400 => FailureKind::Invalid,
            401 => FailureKind::Unauthorized,
            403 => FailureKind::Forbidden,
            404 => FailureKind::NotFound,
            409 => FailureKind::Conflict,
            _ => FailureKind::Other,
        }
    }
}

/// A failed request: its kind and one line saying what was tried and what came back.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, for the exit code.
    pub kind: FailureKind,
    message: String,
}

impl Failure {
    /// A failure of this kind with its message.
    pub fn new(kind: FailureKind, message: String) -> Failure {
        Failure { kind, message }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Where the token came from, to say which one was refused (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--admin-token-file` (or `CHARTER_ADMIN_TOKEN_FILE`).
    File(PathBuf),
    /// `CHARTER_ADMIN_TOKEN`.
    Env,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => write!(f, "--admin-token-file {}", path.display()),
            TokenSource::Env => f.write_str(TOKEN_ENV),
        }
    }
}

/// An admin token and where it came from.
pub struct Token {
    value: String,
    source: TokenSource,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a token.
        write!(f, "Token(from {})", self.source)
    }
}

impl Token {
    /// The token of `--admin-token-file` when given, else of `CHARTER_ADMIN_TOKEN` (`env`
    /// is its value), else none.
    pub fn load(file: Option<&Path>, env: Option<String>) -> Result<Option<Token>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --admin-token-file {}", path.display()))?;
            let value = token_of_file(&text)
                .with_context(|| format!("--admin-token-file {}", path.display()))?;
            return Ok(Some(Token {
                value,
                source: TokenSource::File(path.to_path_buf()),
            }));
        }
        match env {
            Some(value) if !value.trim().is_empty() => {
                let value = value.trim().to_owned();
                check_header_safe(&value).with_context(|| TOKEN_ENV.to_owned())?;
                Ok(Some(Token {
                    value,
                    source: TokenSource::Env,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Where the token came from.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }
}

/// The one token of a token file: the token alone on a line, or the control plane's own
/// `TOKEN read|write` form with a single line; blank lines and `#` comments are skipped.
pub fn token_of_file(text: &str) -> Result<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let line = match lines.as_slice() {
        [] => bail!("holds no token"),
        [line] => *line,
        more => bail!(
            "holds {} tokens, and charterctl sends one: give it a file with just the token to use",
            more.len()
        ),
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let token = match words.as_slice() {
        [token] | [token, "read" | "write"] => *token,
        _ => bail!("expected the token alone on its line (or `TOKEN read|write`)"),
    };
    check_header_safe(token)?;
    Ok(token.to_owned())
}

/// Refuses a token an HTTP header cannot carry as it is.
fn check_header_safe(token: &str) -> Result<()> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the token has characters an HTTP header cannot carry (only visible ASCII)");
    }
    Ok(())
}

/// The admin API's base URL, checked: `http://HOST[:PORT][/PREFIX]`, without a trailing
/// slash, so `base + "/licenses"` is the route.
pub fn base_url(admin_url: &str) -> Result<String> {
    // Messages quote the URL without any `user:password@`, which must not reach a log.
    let shown = redacted(admin_url);
    if !admin_url.contains("://") {
        bail!("--admin-url `{shown}` has no scheme; write it as http://{shown}");
    }
    let url = url::Url::parse(admin_url)
        .with_context(|| format!("--admin-url `{shown}` is not a URL"))?;
    match url.scheme() {
        "http" => {}
        "https" => bail!(
            "--admin-url `{shown}`: https is not supported; the control plane's admin API serves plain HTTP (use http://HOST:PORT)"
        ),
        other => {
            bail!("--admin-url `{shown}`: scheme `{other}` is not supported; use http://HOST:PORT")
        }
    }
    if url.host().is_none() {
        bail!("--admin-url `{shown}` names no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        bail!(
            "--admin-url `{shown}` carries credentials, which the admin API does not use; pass the token with --admin-token-file or {TOKEN_ENV}"
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("--admin-url `{shown}` has a query or fragment; give only http://HOST:PORT and an optional path prefix");
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A URL as it may be shown: any `user:password@` before the host replaced by `***@`.
pub fn redacted(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..authority_start], &rest[at..]),
        None => url.to_owned(),
    }
}

/// A license id as one path segment: every byte but RFC 3986's unreserved ones
/// percent-encoded, so an id can never reach another route. The empty id and the dot
/// segments, which URL normalization would turn into another path, are refused.
pub fn id_segment(id: &str) -> Result<String> {
    if matches!(id, "" | "." | "..") {
        bail!("`{id}` is not a license id; `charterctl license list` shows the stored ones");
    }
    let mut segment = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            segment.push(char::from(byte));
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(segment)
}

/// A successful answer: the status and the body text.
#[derive(Debug)]
pub struct Answer {
    /// The 2xx status.
    pub status: u16,
    /// The body, as sent.
    pub body: String,
    /// `METHOD URL`, for messages about the body.
    pub request: String,
}

impl Answer {
    /// The body as JSON; a body that is not JSON means `--admin-url` is not the admin API.
    pub fn json(&self) -> Result<Value, Failure> {
        serde_json::from_str(&self.body).map_err(|e| {
            Failure::new(
                FailureKind::Other,
                format!(
                    "{} answered {} with a body that is not JSON ({e}): {}; is --admin-url a Charter control plane's admin API?",
                    self.request,
                    self.status,
                    quote(&self.body)
                ),
            )
        })
    }
}

/// A client of one control plane's admin API.
pub struct Client {
    base: String,
    token: Option<Token>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the admin API at `base` (from [`base_url`]).
    pub fn new(base: String, token: Option<Token>) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            // The admin API never redirects; following one could carry the token elsewhere.
            .redirects(0)
            .user_agent(concat!("charterctl/", env!("CARGO_PKG_VERSION")))
            .build();
        Client { base, token, agent }
    }

    /// The admin API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`, expecting a 2xx.
    pub fn get(&self, path: &str) -> Result<Answer, Failure> {
        self.send("GET", path, None)
    }

    /// A request to `path` (which starts with `/`, below the base URL) with an optional
    /// JSON body, expecting a 2xx; anything else is a [`Failure`] carrying the API's message.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, Failure> {
        let url = format!("{}{}", self.base, path);
        let request_line = format!("{method} {url}");
        let mut request = self.agent.request(method, &url);
        if let Some(token) = &self.token {
            request = request.set(TOKEN_HEADER, &token.value);
        }
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(transport)) => {
                return Err(self.unreachable(&request_line, &transport))
            }
        };
        let status = response.status();
        let location = response.header("location").map(str::to_owned);
        let mut text = String::new();
        if let Err(e) = response.into_reader().read_to_string(&mut text) {
            return Err(Failure::new(
                FailureKind::Unreachable,
                format!("{request_line} answered {status}, then reading the body failed: {e}"),
            ));
        }
        if (200..300).contains(&status) {
            return Ok(Answer {
                status,
                body: text,
                request: request_line,
            });
        }
        if (300..400).contains(&status) {
            let to = location.unwrap_or_else(|| "nowhere".to_owned());
            return Err(Failure::new(
                FailureKind::Other,
                format!(
                    "{request_line} answered {status}, a redirect to {to}; point --admin-url at the control plane's admin API itself"
                ),
            ));
        }
        let kind = FailureKind::of_status(status);
        let mut message = format!("{request_line} answered {status}: {}", api_message(&text));
        if kind == FailureKind::Unauthorized {
            match &self.token {
                None => message.push_str(&format!(
                    "; no token was sent: pass --admin-token-file FILE or set {TOKEN_ENV}"
                )),
                Some(token) => message.push_str(&format!(
                    "; the token from {} is not one the control plane accepts",
                    token.source()
                )),
            }
        }
        Err(Failure::new(kind, message))
    }

    fn unreachable(&self, request_line: &str, transport: &ureq::Transport) -> Failure {
        let mut cause = transport.kind().to_string().to_lowercase();
        if let Some(message) = transport.message() {
            cause.push_str(": ");
            cause.push_str(message);
        }
        if let Some(source) = std::error::Error::source(transport) {
            cause.push_str(": ");
            cause.push_str(&source.to_string());
        }
        Failure::new(
            FailureKind::Unreachable,
            format!(
                "cannot reach the admin API at {} ({request_line}: {cause}); is charter-cp running and listening there? (--admin-url, CHARTER_ADMIN_URL)",
                self.base
            ),
        )
    }
}

/// The message of an admin API error body: Kong's `message` (with Charter's `detail` when
/// there is one), or the start of whatever else came back.
pub fn api_message(body: &str) -> String {
    if let Ok(value) = serde_json::from_str::<Value>(body) {
        if let Some(message) = value.get("message").and_then(Value::as_str) {
            return match value.get("detail").and_then(Value::as_str) {
                Some(detail) => format!("{message} ({detail})"),
                None => message.to_owned(),
            };
        }
    }
    if body.trim().is_empty() {
        "no body".to_owned()
    } else {
        quote(body)
    }
}

/// The start of a body, on one line.
fn quote(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("`{}…`", &one_line[..cut]),
        None => format!("`{one_line}`"),
    }
}
