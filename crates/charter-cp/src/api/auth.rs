//! Admin API tokens: the `TOKEN read|write` file and the middleware that checks
//! `Kong-Admin-Token` or `Authorization: Bearer` on every route but `/status`, the web
//! console's shell (`/ui`) and Consul's `GET /v1/operator/license` (which also takes
//! `X-Consul-Token`).

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, ApiState};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET and HEAD only.
    Read,
    /// Everything.
    Write,
}

impl Access {
    /// `read` or `write`, as in the token file.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The admin tokens of a control plane.
#[derive(Clone)]
pub struct Tokens(Vec<(String, Access)>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

/// A malformed token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// A line that is not `TOKEN read|write`.
    #[error("line {line}: expected `TOKEN read` or `TOKEN write`")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// The same token twice.
    #[error("line {line}: this token is already listed")]
    Duplicate {
        /// 1-based line number.
        line: usize,
    },
    /// No token at all.
    #[error("no tokens: add lines of the form `TOKEN read|write`")]
    Empty,
}

impl Tokens {
    /// Parses `TOKEN read|write` lines; blank lines and `#` comments are ignored.
    pub fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        let mut tokens: Vec<(String, Access)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(token), Some(access), None) = (words.next(), words.next(), words.next())
            else {
                return Err(TokenFileError::BadLine { line: index + 1 });
            };
            let access = match access {
                "read" => Access::Read,
                "write" => Access::Write,
                _ => return Err(TokenFileError::BadLine { line: index + 1 }),
            };
            if tokens.iter().any(|(t, _)| t == token) {
                return Err(TokenFileError::Duplicate { line: index + 1 });
            }
            tokens.push((token.to_owned(), access));
        }
        if tokens.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Tokens(tokens))
    }

    /// How many tokens are configured (the report's `rbac_users`).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no tokens are configured (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The access a presented token grants, comparing in constant time.
    pub fn access(&self, presented: &str) -> Option<Access> {
        let mut found = None;
        for (token, access) in &self.0 {
            if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(*access);
            }
        }
        found
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched without
/// regard to case (RFC 9110 section 11.1, formerly RFC 7235: `bearer`, `BEARER` and
/// `Bearer` are one scheme), and separated from the token by one or more spaces.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The path of Consul's face.
const CONSUL_PATH: &str = "/v1/operator/license";

/// Checks the admin token of a request, when tokens are configured, and hands the access it
/// grants to the handler as a request extension ([`Access`]).
///
/// Three kinds of request need none: `/status` (for probes and load balancers), the web
/// console's shell (`/ui` and its scripts and styles, which hold no data: every call the
/// page makes carries the token), and Consul's
/// `GET /v1/operator/license`, whose ACL is "none" in Consul (seed 004): it shows the
/// license's terms, never its key. Its `?signed=1`, the raw document with the license key
/// in it, still needs a token (read or write). On Consul's path a token is also
/// taken from `X-Consul-Token`, where Consul's tools send it.
pub async fn require_token(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = state.tokens() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let consul = path == CONSUL_PATH;
    let open = path == "/status"
        || super::console::is_shell(path)
        || (consul
            && matches!(*request.method(), Method::GET | Method::HEAD)
            // A query that does not parse is the handler's 400, which shows nothing.
            && !super::consul::wants_signed(request.uri().query()).unwrap_or(false));
    if open {
        return next.run(request).await;
    }
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let presented = header("kong-admin-token")
        .or_else(|| header("authorization").and_then(bearer_token))
        .or_else(|| header("x-consul-token").filter(|_| consul));
    match presented.and_then(|token| tokens.access(token.trim())) {
        None => ApiError::Unauthorized.into_response(),
        Some(Access::Read) if !matches!(*request.method(), Method::GET | Method::HEAD) => {
            ApiError::Forbidden.into_response()
        }
        Some(access) => {
            request.extensions_mut().insert(access);
            next.run(request).await
        }
    }
}
