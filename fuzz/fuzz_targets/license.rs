//! The license document parser and verifier on arbitrary text: what a control plane reads
//! from a POST body's `payload`, and a data plane from a snapshot or its cache.
//!
//! Beyond "never panics", it checks what the rest of Charter leans on:
//! - a document and the admin-API record wrapping it (`{"payload":"<document>"}`) read the
//!   same;
//! - the signed bytes (the payload's canonical form) are never empty, so no signature over
//!   nothing can stand for every payload;
//! - a document written back out (`to_json`) reads as the same document;
//! - any payload the parser takes, signed with the committed test key, verifies, and still
//!   verifies once written out and read back (what `charterctl sign` then a data plane do),
//!   but not with one bit of its signature flipped; and it can be judged at any time.

#![no_main]

use std::sync::LazyLock;

use charter_license::{
    LicenseDocument, LicenseSigner, Status, TrustedKey, TrustedKeys, UnixTime, VerifiedLicense,
    EXPIRING_DAYS, GRACE_DAYS,
};
use libfuzzer_sys::fuzz_target;

/// The committed test vector's key pair (`crates/charter-license/testdata`).
static SIGNER: LazyLock<LicenseSigner> = LazyLock::new(|| {
    LicenseSigner::from_pem(include_str!(
        "../../crates/charter-license/testdata/vector.key"
    ))
    .expect("the committed test key reads")
});
static KEYS: LazyLock<TrustedKeys> = LazyLock::new(|| {
    let public = TrustedKey::from_pem(include_str!(
        "../../crates/charter-license/testdata/vector.pub"
    ))
    .expect("the committed test public key reads");
    assert_eq!(public.id(), SIGNER.key_id(), "the test key pair matches");
    TrustedKeys::new([public])
});

/// Times to judge a license at: the ends of the range, the epoch, and today-ish and
/// far-future days.
const TIMES: [UnixTime; 6] = [
    UnixTime::MIN,
    -1,
    0,
    1_767_225_600,
    4_102_444_800,
    UnixTime::MAX,
];

fuzz_target!(|data: &[u8]| {
    // Every reader of a license has a `&str` (a JSON string, a file read as UTF-8).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = LicenseDocument::parse(text);
    let record = serde_json::json!({ "payload": text }).to_string();
    match (&parsed, LicenseDocument::parse(&record)) {
        (Ok(document), Ok(via_record)) => assert_eq!(document, &via_record),
        (Err(e), Err(via_record)) => assert_eq!(e.code, via_record.code),
        (direct, via_record) => {
            panic!("the document and its record read differently: {direct:?} / {via_record:?}")
        }
    }
    let Ok(document) = parsed else {
        return;
    };
    assert!(
        document.canonical_payload().starts_with(b"{"),
        "the canonical payload is not an object"
    );
    assert_eq!(
        LicenseDocument::parse(&document.to_json()).as_ref(),
        Ok(&document),
        "the document written out reads back differently"
    );
    if let Ok(verified) = KEYS.verify(&document) {
        judge(&verified);
    }

    // Past the signature: the same payload, signed with the test key.
    let Ok(signed) = SIGNER.sign(document.payload().clone()) else {
        return;
    };
    let verified = KEYS
        .verify(&signed)
        .expect("a payload signed with a trusted key verifies");
    assert_eq!(verified.key_id, SIGNER.key_id());
    judge(&verified);
    let written = signed.to_json();
    let read_back = LicenseDocument::parse(&written).expect("a signed document reads back");
    KEYS.verify(&read_back)
        .expect("a signed document, written out and read back, verifies");
    let mut flipped = *signed.signature();
    let bit = data.len() % (64 * 8);
    flipped[bit / 8] ^= 1 << (bit % 8);
    let forged = LicenseDocument::from_parts(signed.payload().clone(), flipped)
        .expect("the payload's shape was checked already");
    assert!(
        KEYS.verify(&forged).is_err(),
        "a signature with a flipped bit verifies"
    );
});

/// Judges a verified license at every time of [`TIMES`], checking the status against the
/// days left.
fn judge(verified: &VerifiedLicense) {
    let terms = &verified.terms;
    assert!(terms.expiration_date >= terms.creation_date);
    for now in TIMES {
        let Ok(evaluation) = verified.evaluate(now) else {
            continue;
        };
        let days = evaluation.days_left;
        let expected = if days > EXPIRING_DAYS {
            Status::Valid
        } else if days >= 0 {
            Status::Expiring
        } else if -days <= GRACE_DAYS {
            Status::Grace
        } else {
            Status::Expired
        };
        assert_eq!(evaluation.status, expected, "at {now}: {evaluation:?}");
        assert_eq!(
            charter_license::validate(&verified.document.to_json(), &KEYS, now)
                .map(|(_, e)| e)
                .as_ref(),
            Ok(&evaluation)
        );
    }
}
