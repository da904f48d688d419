//! Ed25519 keys: the vendor's signing key, the set of trusted public keys, and key ids.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::document::{canonical_payload, LicenseDocument, Terms};
use crate::error::{ErrorCode, LicenseError};

/// A key id: the first 16 hex characters of SHA-256 of the raw 32-byte public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    /// The id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A key file that could not be read as the expected kind of key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a PEM SPKI Ed25519 public key.
    #[error("not an Ed25519 public key in SPKI PEM form (\"-----BEGIN PUBLIC KEY-----\"): {0}")]
    PublicKey(String),
    /// Not a PEM PKCS#8 Ed25519 private key.
    #[error(
        "not an Ed25519 private key in PKCS#8 PEM form (\"-----BEGIN PRIVATE KEY-----\"): {0}"
    )]
    PrivateKey(String),
}

/// A public key trusted to sign licenses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    id: KeyId,
    key: VerifyingKey,
}

impl TrustedKey {
    /// Reads an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<TrustedKey, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| KeyError::PublicKey(e.to_string()))?;
        Ok(TrustedKey::from_verifying_key(key))
    }

    /// Wraps a raw public key.
    pub fn from_verifying_key(key: VerifyingKey) -> TrustedKey {
        TrustedKey {
            id: KeyId::of(&key),
            key,
        }
    }

    /// The key id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key as SPKI PEM.
    pub fn to_pem(&self) -> String {
        // Encoding a valid 32-byte key into SPKI cannot fail; the fallback keeps this total.
        self.key
            .to_public_key_pem(Default::default())
            .unwrap_or_default()
    }
}

/// The set of public keys a node trusts.
///
/// A set, so a vendor can rotate with no gap: add the new key everywhere, re-sign, then
/// remove the old key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// A set of keys; the same key given twice is kept once.
    pub fn new(keys: impl IntoIterator<Item = TrustedKey>) -> TrustedKeys {
        let mut set = TrustedKeys::default();
        for key in keys {
            if !set.keys.iter().any(|k| k.id == key.id) {
                set.keys.push(key);
            }
        }
        set
    }

    /// The ids of the keys in the set.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Whether the set is empty (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies the document's signature strictly (`verify_strict`) against each key, then
    /// reads its terms. Returns the license with the id of the key that verified it.
    pub fn verify(&self, document: &LicenseDocument) -> Result<VerifiedLicense, LicenseError> {
        let signature = Signature::from_bytes(document.signature());
        let message = document.canonical_payload();
        let key = self
            .keys
            .iter()
            .find(|k| k.key.verify_strict(&message, &signature).is_ok())
            .ok_or_else(|| {
                let ids: Vec<String> = self.keys.iter().map(|k| k.id.to_string()).collect();
                LicenseError::new(
                    ErrorCode::ValidationFail,
                    format!(
                        "signature does not verify against any trusted key ({} trusted: {}); the license was signed by another key or changed after signing",
                        ids.len(),
                        if ids.is_empty() { "none".to_owned() } else { ids.join(", ") }
                    ),
                )
            })?;
        let terms = document.terms()?;
        Ok(VerifiedLicense {
            document: document.clone(),
            key_id: key.id,
            terms,
        })
    }

    /// Parses and verifies a license text (a document or an admin-API record).
    pub fn verify_text(&self, text: &str) -> Result<VerifiedLicense, LicenseError> {
        self.verify(&LicenseDocument::parse(text)?)
    }
}

/// A license whose signature verified against a trusted key, with its terms read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLicense {
    /// The document.
    pub document: LicenseDocument,
    /// The trusted key that verified it.
    pub key_id: KeyId,
    /// Its typed terms.
    pub terms: Terms,
}

/// The vendor's private signing key.
pub struct LicenseSigner {
    key: SigningKey,
}

impl fmt::Debug for LicenseSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("LicenseSigner")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl LicenseSigner {
    /// A signer from a 32-byte secret seed (the caller brings the randomness).
    pub fn from_seed(seed: [u8; 32]) -> LicenseSigner {
        LicenseSigner {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<LicenseSigner, KeyError> {
        let key = SigningKey::from_pkcs8_pem(pem.trim())
            .map_err(|e| KeyError::PrivateKey(e.to_string()))?;
        Ok(LicenseSigner { key })
    }

    /// The private key as PKCS#8 PEM. Write it with mode 0600.
    pub fn to_pem(&self) -> String {
        // Encoding a valid key into PKCS#8 cannot fail; the fallback keeps this total.
        self.key
            .to_pkcs8_pem(Default::default())
            .map(|pem| pem.to_string())
            .unwrap_or_default()
    }

    /// The matching public key.
    pub fn trusted_key(&self) -> TrustedKey {
        TrustedKey::from_verifying_key(self.key.verifying_key())
    }

    /// The id of the matching public key.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.key.verifying_key())
    }

    /// Signs a payload object into a license document. The payload must already have
    /// Kong's shape and usable dates, so a vendor never ships a license nobody can load.
    pub fn sign(&self, payload: Map<String, Value>) -> Result<LicenseDocument, LicenseError> {
        let signature = self.key.sign(&canonical_payload(&payload)).to_bytes();
        let document = LicenseDocument::from_parts(payload, signature)?;
        document.terms()?;
        Ok(document)
    }
}
