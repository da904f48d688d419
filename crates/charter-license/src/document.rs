//! The Kong license document: parsing (from the document or an admin-API record), the
//! typed terms of its payload, and its canonical form.

use serde_json::{Map, Value};
use time::{macros::format_description, Date};

use crate::error::{ErrorCode, LicenseError};

/// The only document version Charter (and Kong) knows.
pub const DOCUMENT_VERSION: &str = "1";

/// Payload fields every license must carry, as strings.
const REQUIRED_FIELDS: [&str; 5] = [
    "customer",
    "license_creation_date",
    "license_expiration_date",
    "license_key",
    "product_subscription",
];

/// Payload fields Kong's licenses carry that may be absent, but must be strings when present.
const OPTIONAL_STRING_FIELDS: [&str; 3] = ["admin_seats", "dataplanes", "support_plan"];

/// A parsed license document: `{"license":{"payload":{…},"signature":"…","version":"1"}}`.
///
/// Parsing checks the shape only. Whether the signature holds is decided by
/// [`crate::TrustedKeys::verify`], and whether the license is in force at some time by
/// [`crate::VerifiedLicense::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseDocument {
    payload: Map<String, Value>,
    signature: [u8; 64],
}

impl LicenseDocument {
    /// Parses a license document, or an admin-API record whose `payload` field holds the
    /// document as a string (`{"payload":"{\"license\":…}"}`).
    pub fn parse(text: &str) -> Result<LicenseDocument, LicenseError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            LicenseError::new(
                ErrorCode::InvalidLicenseJson,
                format!("license is not valid JSON: {e}"),
            )
        })?;
        // Only what the signature pins down exactly: a name given twice, or an integer a
        // double cannot hold, would let two texts share one signature and differ in what
        // a reader takes from them.
        serde_json::from_str::<Unambiguous>(text)
            .map_err(|e| LicenseError::format(format!("license is ambiguous: {e}")))?;
        let Value::Object(top) = value else {
            return Err(LicenseError::format(format!(
                "expected a JSON object with a `license` field, found {}",
                kind(&value)
            )));
        };
        if top.contains_key("license") {
            return LicenseDocument::from_object(top);
        }
        match top.get("payload") {
            Some(Value::String(inner)) => LicenseDocument::parse(inner).map_err(|e| LicenseError {
                code: e.code,
                message: format!("in the record's `payload`: {}", e.message),
            }),
            Some(other) => Err(LicenseError::format(format!(
                "record field `payload` must be a string holding the license document, found {}",
                kind(other)
            ))),
            None => Err(LicenseError::format(
                "expected an object with a `license` field (a license document) or a `payload` field (an admin API record)",
            )),
        }
    }

    fn from_object(mut top: Map<String, Value>) -> Result<LicenseDocument, LicenseError> {
        if let Some(extra) = top.keys().find(|k| *k != "license") {
            return Err(LicenseError::format(format!(
                "unexpected top-level field `{extra}`: a license document has only `license`"
            )));
        }
        let Some(Value::Object(mut license)) = top.remove("license") else {
            return Err(LicenseError::format("field `license` must be an object"));
        };
        if let Some(extra) = license
            .keys()
            .find(|k| !matches!(k.as_str(), "payload" | "signature" | "version"))
        {
            return Err(LicenseError::format(format!(
                "unexpected field `license.{extra}`: expected only `payload`, `signature` and `version`"
            )));
        }
        let payload = match license.remove("payload") {
            Some(Value::Object(payload)) => payload,
            Some(other) => {
                return Err(LicenseError::format(format!(
                    "field `license.payload` must be an object, found {}",
                    kind(&other)
                )))
            }
            None => return Err(LicenseError::format("field `license.payload` is missing")),
        };
        let signature = match license.remove("signature") {
            Some(Value::String(s)) => parse_signature(&s)?,
            Some(other) => {
                return Err(LicenseError::format(format!(
                    "field `license.signature` must be a string of 128 hex characters, found {}",
                    kind(&other)
                )))
            }
            None => return Err(LicenseError::format("field `license.signature` is missing")),
        };
        match license.remove("version") {
            Some(Value::String(v)) if v == DOCUMENT_VERSION => {}
            Some(Value::String(v)) => {
                return Err(LicenseError::format(format!(
                    "field `license.version` is \"{v}\", but only version \"{DOCUMENT_VERSION}\" is supported"
                )))
            }
            Some(other) => {
                return Err(LicenseError::format(format!(
                    "field `license.version` must be the string \"{DOCUMENT_VERSION}\", found {}",
                    kind(&other)
                )))
            }
            None => return Err(LicenseError::format("field `license.version` is missing")),
        }
        check_payload_shape(&payload)?;
        Ok(LicenseDocument { payload, signature })
    }

    /// Builds a document from a payload and a signature, checking the payload's shape.
    pub fn from_parts(
        payload: Map<String, Value>,
        signature: [u8; 64],
    ) -> Result<LicenseDocument, LicenseError> {
        check_payload_shape(&payload)?;
        // What `parse` refuses must not be signed: a map cannot repeat a name, but it can
        // hold an integer the canonical form rounds.
        let text = serde_json::to_string(&payload).unwrap_or_default();
        serde_json::from_str::<Unambiguous>(&text)
            .map_err(|e| LicenseError::format(format!("license is ambiguous: {e}")))?;
        Ok(LicenseDocument { payload, signature })
    }

    /// The signed payload object.
    pub fn payload(&self) -> &Map<String, Value> {
        &self.payload
    }

    /// The raw 64-byte Ed25519 signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The signature as 128 lowercase hex characters, as it is written in the document.
    pub fn signature_hex(&self) -> String {
        hex::encode(self.signature)
    }

    /// The bytes that are signed: the RFC 8785 (JCS) canonical JSON of the payload object.
    pub fn canonical_payload(&self) -> Vec<u8> {
        canonical_payload(&self.payload)
    }

    /// A payload string field, if present and a string.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.payload.get(name).and_then(Value::as_str)
    }

    /// The document as a JSON value in Kong's shape.
    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "license": {
                "payload": Value::Object(self.payload.clone()),
                "signature": self.signature_hex(),
                "version": DOCUMENT_VERSION,
            }
        })
    }

    /// The document as compact JSON, keys sorted (the form `charterctl sign` prints).
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The typed terms of the payload, with its dates parsed and checked against each other.
    pub fn terms(&self) -> Result<Terms, LicenseError> {
        Terms::from_payload(&self.payload)
    }
}

/// The largest integer every JSON reader holds exactly (2^53 - 1): RFC 8785 writes numbers
/// as doubles, so beyond it two integers share a canonical form, and one signature.
pub const MAX_EXACT_INTEGER: u64 = (1 << 53) - 1;

/// A JSON text read only to refuse what the canonical form cannot tell apart: a name twice
/// in one object, or an integer beyond [`MAX_EXACT_INTEGER`] in magnitude.
struct Unambiguous;

impl<'de> serde::Deserialize<'de> for Unambiguous {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UnambiguousVisitor)
    }
}

struct UnambiguousVisitor;

impl<'de> serde::de::Visitor<'de> for UnambiguousVisitor {
    type Value = Unambiguous;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unambiguous, E> {
        Ok(Unambiguous)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Unambiguous, E> {
        if n > MAX_EXACT_INTEGER {
            return Err(E::custom(format_args!(
                "the integer {n} is beyond 2^53 - 1, where the signed (canonical) form rounds it; write it as a string"
            )));
        }
        Ok(Unambiguous)
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Unambiguous, E> {
        if n.unsigned_abs() > MAX_EXACT_INTEGER {
            return Err(E::custom(format_args!(
                "the integer {n} is below -(2^53 - 1), where the signed (canonical) form rounds it; write it as a string"
            )));
        }
        Ok(Unambiguous)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Unambiguous, E> {
        Ok(Unambiguous)
    }

    fn visit_str<E>(self, _: &str) -> Result<Unambiguous, E> {
        Ok(Unambiguous)
    }

    fn visit_unit<E>(self) -> Result<Unambiguous, E> {
        Ok(Unambiguous)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unambiguous, A::Error> {
        while seq.next_element::<Unambiguous>()?.is_some() {}
        Ok(Unambiguous)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unambiguous, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(serde::de::Error::custom(format_args!(
                    "the field `{name}` is given twice in one object"
                )));
            }
            map.next_value::<Unambiguous>()?;
        }
        Ok(Unambiguous)
    }
}

/// RFC 8785 (JCS) canonical JSON of a payload object.
pub fn canonical_payload(payload: &Map<String, Value>) -> Vec<u8> {
    // JCS fails only on values JSON cannot hold (NaN, infinities), which a
    // `serde_json::Value` cannot contain, so the fallback is never taken; it keeps the
    // function total rather than panicking.
    serde_jcs::to_vec(payload).unwrap_or_default()
}

/// The typed fields of a license payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    /// `customer`.
    pub customer: String,
    /// `license_key` (never log it raw).
    pub license_key: String,
    /// `product_subscription`.
    pub product_subscription: String,
    /// `support_plan`, if present.
    pub support_plan: Option<String>,
    /// `admin_seats` as a number, if present.
    pub admin_seats: Option<u64>,
    /// `dataplanes`: how many data planes the license covers, if it says.
    pub dataplanes: Option<u64>,
    /// `license_creation_date` (UTC).
    pub creation_date: Date,
    /// `license_expiration_date` (UTC); the license is valid through the whole day.
    pub expiration_date: Date,
    /// `features`, or empty when the payload has none.
    pub features: Vec<String>,
}

impl Terms {
    fn from_payload(payload: &Map<String, Value>) -> Result<Terms, LicenseError> {
        check_payload_shape(payload)?;
        let s = |name: &str| payload.get(name).and_then(Value::as_str).map(str::to_owned);
        let count = |name: &str| -> Result<Option<u64>, LicenseError> {
            match payload.get(name).and_then(Value::as_str) {
                None => Ok(None),
                Some(text) => text.parse::<u64>().map(Some).map_err(|_| {
                    LicenseError::format(format!(
                        "payload field `{name}` must be a whole number written as a string, found \"{text}\""
                    ))
                }),
            }
        };
        let creation_date = parse_date(payload, "license_creation_date")?;
        let expiration_date = parse_date(payload, "license_expiration_date")?;
        if expiration_date < creation_date {
            return Err(LicenseError::dates(format!(
                "license_expiration_date {expiration_date} is before license_creation_date {creation_date}"
            )));
        }
        let features = match payload.get("features") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    LicenseError::format("payload field `features` must be an array of strings")
                })?,
            Some(other) => {
                return Err(LicenseError::format(format!(
                    "payload field `features` must be an array of strings, found {}",
                    kind(other)
                )))
            }
        };
        Ok(Terms {
            customer: s("customer").unwrap_or_default(),
            license_key: s("license_key").unwrap_or_default(),
            product_subscription: s("product_subscription").unwrap_or_default(),
            support_plan: s("support_plan"),
            admin_seats: count("admin_seats")?,
            dataplanes: count("dataplanes")?,
            creation_date,
            expiration_date,
            features,
        })
    }

    /// Whether the license grants a named feature.
    pub fn has_feature(&self, name: &str) -> bool {
        self.features.iter().any(|f| f == name)
    }
}

/// Checks that the payload has Kong's required fields, all strings.
fn check_payload_shape(payload: &Map<String, Value>) -> Result<(), LicenseError> {
    for name in REQUIRED_FIELDS {
        match payload.get(name) {
            Some(Value::String(_)) => {}
            Some(other) => {
                return Err(LicenseError::format(format!(
                    "payload field `{name}` must be a string, found {}",
                    kind(other)
                )))
            }
            None => {
                return Err(LicenseError::format(format!(
                    "payload field `{name}` is missing"
                )))
            }
        }
    }
    for name in OPTIONAL_STRING_FIELDS {
        if let Some(value) = payload.get(name) {
            if !value.is_string() {
                return Err(LicenseError::format(format!(
                    "payload field `{name}` must be a string (Kong writes numbers as strings), found {}",
                    kind(value)
                )));
            }
        }
    }
    Ok(())
}

fn parse_date(payload: &Map<String, Value>, name: &str) -> Result<Date, LicenseError> {
    let text = payload
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default();
    Date::parse(text, format_description!("[year]-[month]-[day]")).map_err(|_| {
        LicenseError::dates(format!(
            "payload field `{name}` is \"{text}\", expected a date as YYYY-MM-DD"
        ))
    })
}

fn parse_signature(text: &str) -> Result<[u8; 64], LicenseError> {
    let mut signature = [0u8; 64];
    if text.len() != 128 {
        return Err(LicenseError::format(format!(
            "field `license.signature` must be 128 hex characters (a 64-byte Ed25519 signature), found {} characters",
            text.len()
        )));
    }
    hex::decode_to_slice(text, &mut signature).map_err(|_| {
        LicenseError::format(
            "field `license.signature` must be 128 hex characters (0-9, a-f), found other characters",
        )
    })?;
    Ok(signature)
}

/// A JSON type name for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
