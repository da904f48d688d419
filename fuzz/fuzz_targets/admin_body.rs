//! The admin API's body reader (JSON and form-urlencoded) on arbitrary bodies, and what a
//! license write does next with the fields: the `payload` goes to the license parser, the
//! `id` to the UUID check.
//!
//! An input is a `Content-Type` line and the body: `application/json\n{"payload":"…"}`.
//! An empty first line sends no `Content-Type`; input without a newline is a body alone.
//!
//! Beyond "never panics", it checks:
//! - an error is a client error (4xx), never a 5xx;
//! - a body of whitespace is no fields;
//! - fields read from JSON are exactly what serde_json reads from the body (so the reader
//!   that refuses repeated names changed nothing else); fields read from a form are its
//!   pairs, each name once, each value a string;
//! - an `id` taken as a UUID is the canonical 8-4-4-4-12 form of that UUID, in any case.

#![no_main]

use charter_cp::fuzzing::{canonical_uuid, read_fields};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(0) => (None, &data[1..]),
        Some(end) => (Some(&data[..end]), &data[end + 1..]),
        None => (None, data),
    };
    let fields = read_fields(content_type, body);
    let fields = match fields {
        Ok(fields) => fields,
        Err(e) => {
            assert!(e.status().is_client_error(), "{e:?} answers {}", e.status());
            return;
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        assert!(fields.is_empty(), "a blank body gave fields: {fields:?}");
        return;
    }
    // The media type as the reader sees it: a value with other than visible ASCII cannot
    // be read as text (`HeaderValue::to_str`), and is no type at all.
    let media = content_type
        .filter(|v| v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if media.as_deref() == Some("application/x-www-form-urlencoded") {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(body).expect("a form the reader took parses");
        assert_eq!(pairs.len(), fields.len(), "a name given twice was taken");
        for (name, value) in pairs {
            assert_eq!(fields.get(&name), Some(&Value::String(value)));
        }
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(parsed)) => assert_eq!(parsed, fields),
            other => panic!("the reader took a body serde_json reads as {other:?}"),
        }
    }

    if let Some(Value::String(payload)) = fields.get("payload") {
        let _ = charter_license::LicenseDocument::parse(payload);
    }
    if let Some(Value::String(id)) = fields.get("id") {
        if let Some(uuid) = canonical_uuid(id) {
            assert!(
                uuid.hyphenated().to_string().eq_ignore_ascii_case(id),
                "{id:?} was taken as {uuid}"
            );
        }
    }
});
