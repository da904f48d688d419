//! Kong's license validation codes and the error that carries one with a precise message.

use std::fmt;

/// Why a license was refused, as Kong names it (in snake_case).
///
/// The order of the variants is the order of the checks: a text that is not JSON never
/// reaches the signature check, and a license whose signature fails never has its dates read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The text is not JSON at all.
    InvalidLicenseJson,
    /// The JSON is not shaped like a license document (missing or mistyped field).
    InvalidLicenseFormat,
    /// The signature does not verify against any trusted key.
    ValidationFail,
    /// The signed dates cannot be used: unparseable, inverted, or a creation date in the future.
    InvalidExpirationDate,
}

impl ErrorCode {
    /// The code as it appears on the wire and in logs, e.g. `validation_fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidLicenseJson => "invalid_license_json",
            ErrorCode::InvalidLicenseFormat => "invalid_license_format",
            ErrorCode::ValidationFail => "validation_fail",
            ErrorCode::InvalidExpirationDate => "invalid_expiration_date",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused license: the Kong code and a message saying exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct LicenseError {
    /// The validation code.
    pub code: ErrorCode,
    /// What is wrong, naming the field and what was expected.
    pub message: String,
}

impl LicenseError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> LicenseError {
        LicenseError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn format(message: impl Into<String>) -> LicenseError {
        LicenseError::new(ErrorCode::InvalidLicenseFormat, message)
    }

    pub(crate) fn dates(message: impl Into<String>) -> LicenseError {
        LicenseError::new(ErrorCode::InvalidExpirationDate, message)
    }
}
