//! Unit and property tests of the license domain, all with injected times.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use time::macros::date;
use time::Date;

use super::*;

const VECTOR_KEY: &str = include_str!("../testdata/vector.key");
const VECTOR_PUB: &str = include_str!("../testdata/vector.pub");
const VECTOR_LICENSE: &str = include_str!("../testdata/vector.license.json");
const VECTOR_KEY_ID: &str = "70cbdba60ff4137e";
const KONG_SEED_LICENSE: &str = include_str!("../testdata/kong-seed-license.json");

fn signer() -> LicenseSigner {
    LicenseSigner::from_seed([7; 32])
}

fn keys() -> TrustedKeys {
    TrustedKeys::new([signer().trusted_key()])
}

fn payload(creation: &str, expiration: &str) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": creation,
        "license_expiration_date": expiration,
        "license_key": "00141000017ODj3AAG_a1V41000004wT0OEAU",
        "product_subscription": "Konnect Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    map
}

/// Signs a payload without the sign-time checks, so a test can make a signed license
/// with bad dates, as a careless vendor tool might.
fn sign_raw(payload: &Map<String, Value>) -> String {
    use ed25519_dalek::Signer;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let signature = key.sign(&canonical_payload(payload)).to_bytes();
    json!({"license": {"payload": payload, "signature": hex::encode(signature), "version": "1"}})
        .to_string()
}

fn noon(day: Date) -> UnixTime {
    day.midnight().assume_utc().unix_timestamp() + 12 * 3600
}

fn days_before(day: Date, n: i64) -> Date {
    day - time::Duration::days(n)
}

// --- validation codes ------------------------------------------------------------------

fn check_refused(text: &str, code: ErrorCode, message_part: &str) {
    let err = validate(text, &keys(), noon(date!(2026 - 06 - 01)))
        .expect_err(&format!("expected {code} for {text}"));
    assert_eq!(err.code, code, "{text}: {}", err.message);
    assert!(
        err.message.contains(message_part),
        "message for {text} was {:?}, expected it to mention {message_part:?}",
        err.message
    );
}

#[test]
fn every_validation_code() {
    let good = signer()
        .sign(payload("2026-01-01", "2027-01-01"))
        .expect("signs")
        .to_value();
    let with = |path: &[&str], value: Value| {
        let mut doc = good.clone();
        let mut target = &mut doc;
        for p in &path[..path.len() - 1] {
            target = &mut target[*p];
        }
        let last = path[path.len() - 1];
        match value {
            Value::Null => {
                target.as_object_mut().expect("object").remove(last);
            }
            v => target[last] = v,
        }
        doc.to_string()
    };
    use ErrorCode::*;
    check_refused("not json", InvalidLicenseJson, "not valid JSON");
    check_refused("{\"license\":", InvalidLicenseJson, "line 1");
    check_refused("[]", InvalidLicenseFormat, "found an array");
    check_refused("{}", InvalidLicenseFormat, "`license` field");
    check_refused(
        "{\"license\":1}",
        InvalidLicenseFormat,
        "`license` must be an object",
    );
    check_refused("{\"payload\":5}", InvalidLicenseFormat, "must be a string");
    check_refused(
        "{\"payload\":\"nope\"}",
        InvalidLicenseJson,
        "record's `payload`",
    );
    check_refused(
        &with(&["license", "signature"], Value::Null),
        InvalidLicenseFormat,
        "`license.signature` is missing",
    );
    check_refused(
        &with(&["license", "signature"], json!("abc")),
        InvalidLicenseFormat,
        "found 3 characters",
    );
    check_refused(
        &with(&["license", "signature"], json!("zz".repeat(64))),
        InvalidLicenseFormat,
        "other characters",
    );
    check_refused(
        &with(&["license", "signature"], json!(12)),
        InvalidLicenseFormat,
        "found a number",
    );
    check_refused(
        &with(&["license", "version"], json!("2")),
        InvalidLicenseFormat,
        "only version \"1\"",
    );
    check_refused(
        &with(&["license", "version"], json!(1)),
        InvalidLicenseFormat,
        "`license.version` must be",
    );
    check_refused(
        &with(&["license", "version"], Value::Null),
        InvalidLicenseFormat,
        "`license.version` is missing",
    );
    check_refused(
        &with(&["license", "payload"], json!("x")),
        InvalidLicenseFormat,
        "`license.payload` must be an object",
    );
    check_refused(
        &with(&["license", "extra"], json!(1)),
        InvalidLicenseFormat,
        "`license.extra`",
    );
    check_refused(
        &with(&["extra"], json!(1)),
        InvalidLicenseFormat,
        "top-level field `extra`",
    );
    check_refused(
        &with(&["license", "payload", "customer"], Value::Null),
        InvalidLicenseFormat,
        "`customer` is missing",
    );
    check_refused(
        &with(&["license", "payload", "customer"], json!(3)),
        InvalidLicenseFormat,
        "`customer` must be a string",
    );
    check_refused(
        &with(&["license", "payload", "dataplanes"], json!(3)),
        InvalidLicenseFormat,
        "`dataplanes` must be a string",
    );
    // A field changed after signing.
    check_refused(
        &with(&["license", "payload", "customer"], json!("Other Inc")),
        ValidationFail,
        "changed after signing",
    );
    // Signed by a key the node does not trust.
    let foreign = LicenseSigner::from_seed([9; 32])
        .sign(payload("2026-01-01", "2027-01-01"))
        .expect("signs");
    check_refused(
        &foreign.to_json(),
        ValidationFail,
        "does not verify against any trusted key",
    );
    // Validly signed, but dates that cannot be used.
    check_refused(
        &sign_raw(&payload("2026-01-01", "2027/01/01")),
        InvalidExpirationDate,
        "expected a date as YYYY-MM-DD",
    );
    check_refused(
        &sign_raw(&payload("yesterday", "2027-01-01")),
        InvalidExpirationDate,
        "`license_creation_date`",
    );
    check_refused(
        &sign_raw(&payload("2026-01-01", "2025-12-31")),
        InvalidExpirationDate,
        "is before license_creation_date",
    );
    check_refused(
        &sign_raw(&payload("2026-06-02", "2027-01-01")),
        InvalidExpirationDate,
        "in the future",
    );
    let mut bad_seats = payload("2026-01-01", "2027-01-01");
    bad_seats.insert("admin_seats".into(), json!("many"));
    check_refused(
        &sign_raw(&bad_seats),
        InvalidLicenseFormat,
        "`admin_seats` must be a whole number",
    );
    let mut bad_features = payload("2026-01-01", "2027-01-01");
    bad_features.insert("features".into(), json!("rbac"));
    check_refused(
        &sign_raw(&bad_features),
        InvalidLicenseFormat,
        "`features` must be an array of strings",
    );
}

#[test]
fn record_form_is_accepted() {
    let document = signer()
        .sign(payload("2026-01-01", "2027-01-01"))
        .expect("signs");
    let record = json!({"id": "30b4edb7-0847-4f65-af90-efbed8b0161f", "payload": document.to_json(), "created_at": 1, "updated_at": 1});
    let (verified, _) = validate(&record.to_string(), &keys(), noon(date!(2026 - 06 - 01)))
        .expect("record verifies");
    assert_eq!(verified.document, document);
}

#[test]
fn kong_seed_license_is_refused_with_validation_fail() {
    let err = validate(KONG_SEED_LICENSE, &keys(), noon(date!(2017 - 07 - 20)))
        .expect_err("Kong's key is not trusted");
    assert_eq!(err.code, ErrorCode::ValidationFail);
    assert!(
        err.message.contains("signed by another key"),
        "{}",
        err.message
    );
    // Its shape is Kong's, so it parses: the refusal is about the signature alone.
    let document = LicenseDocument::parse(KONG_SEED_LICENSE).expect("Kong's document parses");
    assert_eq!(document.field("customer"), Some("Example Company, Inc"));
}

// --- statuses --------------------------------------------------------------------------

const EXPIRY: Date = date!(2030 - 06 - 30);

fn check_status(
    now: UnixTime,
    status: Status,
    days_left: i64,
    grace_left: Option<i64>,
    severity: Option<Severity>,
) {
    let text = signer()
        .sign(payload("2020-01-01", "2030-06-30"))
        .expect("signs")
        .to_json();
    let (_, e) = validate(&text, &keys(), now).expect("verifies");
    assert_eq!(
        (e.status, e.days_left, e.grace_days_left, e.severity()),
        (status, days_left, grace_left, severity),
        "at {}",
        utc_date(now)
    );
    assert_eq!(
        e.warnings.is_empty(),
        status == Status::Valid,
        "warnings {:?}",
        e.warnings
    );
}

#[test]
fn every_status_boundary() {
    use Severity::*;
    use Status::*;
    let at = |n: i64| noon(days_before(EXPIRY, n));
    check_status(at(91), Valid, 91, None, None);
    check_status(at(90), Expiring, 90, None, Some(Warn));
    check_status(at(89), Expiring, 89, None, Some(Warn));
    check_status(at(31), Expiring, 31, None, Some(Warn));
    check_status(at(30), Expiring, 30, None, Some(Error));
    check_status(at(1), Expiring, 1, None, Some(Error));
    // The expiration day is valid through its last second.
    let day_start = EXPIRY.midnight().assume_utc().unix_timestamp();
    check_status(day_start, Expiring, 0, None, Some(Error));
    check_status(day_start + 86_399, Expiring, 0, None, Some(Error));
    check_status(day_start + 86_400, Grace, -1, Some(29), Some(Critical));
    check_status(at(-30), Grace, -30, Some(0), Some(Critical));
    check_status(at(-31), Expired, -31, None, Some(Critical));
    check_status(at(-4000), Expired, -4000, None, Some(Critical));
}

#[test]
fn creation_day_is_in_force_from_its_first_second() {
    let text = signer()
        .sign(payload("2030-01-01", "2031-01-01"))
        .expect("signs")
        .to_json();
    let start = date!(2030 - 01 - 01)
        .midnight()
        .assume_utc()
        .unix_timestamp();
    assert_eq!(
        validate(&text, &keys(), start).expect("in force").1.status,
        Status::Valid
    );
    let err = validate(&text, &keys(), start - 1).expect_err("not yet");
    assert_eq!(err.code, ErrorCode::InvalidExpirationDate);
}

#[test]
fn allows_decides_as_evaluate_does_on_every_day_around_the_dates() {
    let text = signer()
        .sign(payload("2030-01-01", "2030-06-30"))
        .expect("signs")
        .to_json();
    let (license, _) = validate(&text, &keys(), noon(date!(2030 - 03 - 01))).expect("verifies");
    let first = date!(2029 - 12 - 30)
        .midnight()
        .assume_utc()
        .unix_timestamp();
    // Every hour from two days before the creation date to past the grace period's end,
    // and each day's first and last second.
    for hour in 0..(250 * 24) {
        for now in [first + hour * 3600, first + hour * 3600 + 3599] {
            let judged = license.evaluate(now).is_ok_and(|e| e.status.allows());
            assert_eq!(license.allows(now), judged, "at {now} ({})", utc_date(now));
        }
    }
}

#[test]
fn allows_matches_enforcement_table() {
    for (status, allowed) in [
        (Status::Valid, true),
        (Status::Expiring, true),
        (Status::Grace, true),
        (Status::Expired, false),
        (Status::Unlicensed, false),
    ] {
        assert_eq!(status.allows(), allowed, "{status}");
    }
}

#[test]
fn clock_set_backwards_never_revives_an_expired_license() {
    let text = signer()
        .sign(payload("2020-01-01", "2030-06-30"))
        .expect("signs")
        .to_json();
    let wall = FixedClock::new(noon(date!(2030 - 09 - 01)));
    let clock = MonotonicClock::new(wall, 0);
    assert_eq!(
        validate(&text, &keys(), clock.now())
            .expect("verifies")
            .1
            .status,
        Status::Expired
    );
    clock.inner().set(noon(date!(2029 - 01 - 01)));
    assert_eq!(
        validate(&text, &keys(), clock.now())
            .expect("verifies")
            .1
            .status,
        Status::Expired
    );
    // The mark, persisted and restored, keeps the decision across a restart.
    let restored = MonotonicClock::new(FixedClock::new(noon(date!(2029 - 01 - 01))), clock.mark());
    assert_eq!(
        validate(&text, &keys(), restored.now())
            .expect("verifies")
            .1
            .status,
        Status::Expired
    );
}

#[test]
fn a_mark_more_than_a_day_ahead_of_the_clock_is_reported_with_both_dates() {
    let noon_2026 = noon(date!(2026 - 03 - 01));
    let check = |mark: UnixTime| MonotonicClock::new(FixedClock::new(noon_2026), mark).mark_ahead();
    assert_eq!(check(0), None, "no mark");
    assert_eq!(
        check(noon_2026 - 10 * 86_400),
        None,
        "a mark behind the clock"
    );
    assert_eq!(check(noon_2026 + 3_600), None, "an hour ahead is drift");
    assert_eq!(check(noon_2026 + MARK_AHEAD_LIMIT), None, "exactly a day");
    let year_2100 = 4_102_444_800;
    let ahead = check(year_2100).expect("a mark in 2100 is reported");
    assert_eq!(
        ahead,
        MarkAhead {
            mark: year_2100,
            clock: noon_2026
        }
    );
    let message = ahead.to_string();
    for needle in ["2100-01-01T00:00:00Z", "2026-03-01T12:00:00Z", "days ahead"] {
        assert!(message.contains(needle), "`{needle}` in: {message}");
    }
    assert_eq!(
        check(i64::MAX).map(|a| a.clock),
        Some(noon_2026),
        "no overflow"
    );
    assert!(rfc3339(i64::MAX).contains("Unix seconds"));
}

// --- selection -------------------------------------------------------------------------

fn candidate(
    name: &'static str,
    updated_at: i64,
    revision: u64,
    status: Status,
) -> Candidate<&'static str> {
    Candidate {
        item: name,
        updated_at,
        revision,
        status,
    }
}

#[test]
fn newest_updated_at_wins_and_revision_breaks_ties() {
    use Status::*;
    let none: [Candidate<&str>; 0] = [];
    assert_eq!(select_effective(&none).effective, None);
    let c = [
        candidate("old", 10, 5, Valid),
        candidate("new", 20, 1, Valid),
        candidate("mid", 15, 9, Valid),
    ];
    assert_eq!(select_effective(&c).effective.map(|c| c.item), Some("new"));
    let tie = [candidate("a", 20, 3, Valid), candidate("b", 20, 4, Valid)];
    assert_eq!(select_effective(&tie).effective.map(|c| c.item), Some("b"));
}

#[test]
fn flags_an_expired_effective_license_when_another_is_not() {
    use Status::*;
    let s = [
        candidate("renewal", 10, 1, Valid),
        candidate("stale", 20, 2, Expired),
    ];
    let selection = select_effective(&s);
    assert_eq!(selection.effective.map(|c| c.item), Some("stale"));
    assert!(selection.expired_while_other_valid);
    let grace = [
        candidate("renewal", 10, 1, Expiring),
        candidate("stale", 20, 2, Grace),
    ];
    assert!(select_effective(&grace).expired_while_other_valid);
    let all_expired = [candidate("a", 10, 1, Expired), candidate("b", 20, 2, Grace)];
    assert!(!select_effective(&all_expired).expired_while_other_valid);
    let fine = [candidate("a", 10, 1, Expired), candidate("b", 20, 2, Valid)];
    assert!(!select_effective(&fine).expired_while_other_valid);
}

// --- keys and the committed test vector --------------------------------------------------

#[test]
fn committed_test_vector_keeps_verifying() {
    let public = TrustedKey::from_pem(VECTOR_PUB).expect("vector public key");
    assert_eq!(public.id().to_string(), VECTOR_KEY_ID);
    let keys = TrustedKeys::new([public]);
    let (verified, evaluation) =
        validate(VECTOR_LICENSE, &keys, noon(date!(2026 - 11 - 25))).expect("vector verifies");
    assert_eq!(verified.key_id.to_string(), VECTOR_KEY_ID);
    assert_eq!(evaluation.status, Status::Valid);
    assert_eq!(verified.terms.features, ["rbac", "gate"]);
    assert_eq!(verified.terms.dataplanes, Some(3));
    // Ed25519 is deterministic: re-signing the payload with the committed key must give the
    // committed signature, which pins the canonical form byte for byte.
    let signer = LicenseSigner::from_pem(VECTOR_KEY).expect("vector private key");
    assert_eq!(signer.key_id().to_string(), VECTOR_KEY_ID);
    let resigned = signer
        .sign(verified.document.payload().clone())
        .expect("signs");
    assert_eq!(resigned.signature_hex(), verified.document.signature_hex());
}

#[test]
fn canonical_form_is_rfc8785() {
    let Value::Object(map) = json!({"b": "2", "a": {"z": [1, "é", true], "y": null}, "€": "x"})
    else {
        unreachable!()
    };
    let canonical = String::from_utf8(canonical_payload(&map)).expect("utf-8");
    assert_eq!(
        canonical,
        r#"{"a":{"y":null,"z":[1,"é",true]},"b":"2","€":"x"}"#
    );
}

#[test]
fn key_rotation_either_key_verifies_and_names_itself() {
    let old = LicenseSigner::from_seed([1; 32]);
    let new = LicenseSigner::from_seed([2; 32]);
    let both = TrustedKeys::new([old.trusted_key(), new.trusted_key(), old.trusted_key()]);
    assert_eq!(both.ids().len(), 2, "a key given twice is kept once");
    for signer in [&old, &new] {
        let doc = signer
            .sign(payload("2026-01-01", "2027-01-01"))
            .expect("signs");
        assert_eq!(both.verify(&doc).expect("verifies").key_id, signer.key_id());
    }
    let empty = TrustedKeys::new([]);
    let doc = old
        .sign(payload("2026-01-01", "2027-01-01"))
        .expect("signs");
    assert!(empty
        .verify(&doc)
        .expect_err("nothing trusted")
        .message
        .contains("none"));
}

#[test]
fn bad_key_pem_is_a_clear_error() {
    assert!(matches!(
        TrustedKey::from_pem("hello"),
        Err(KeyError::PublicKey(_))
    ));
    assert!(matches!(
        TrustedKey::from_pem(VECTOR_KEY),
        Err(KeyError::PublicKey(_))
    ));
    assert!(matches!(
        LicenseSigner::from_pem(VECTOR_PUB),
        Err(KeyError::PrivateKey(_))
    ));
    assert!(
        !format!("{:?}", signer()).contains("key:"),
        "Debug must not print the private key"
    );
}

#[test]
fn sign_refuses_a_payload_nobody_could_load() {
    let err = signer()
        .sign(payload("2026-01-01", "soon"))
        .expect_err("bad date");
    assert_eq!(err.code, ErrorCode::InvalidExpirationDate);
    let mut missing = payload("2026-01-01", "2027-01-01");
    missing.remove("license_key");
    assert_eq!(
        signer().sign(missing).expect_err("missing").code,
        ErrorCode::InvalidLicenseFormat
    );
}

// --- properties ------------------------------------------------------------------------

/// Writes a JSON value with keys in reverse order and extra whitespace everywhere.
fn scrambled(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| format!("\n  {} :\t{} ", Value::String(k.clone()), scrambled(v)))
                .collect();
            format!("{{ {} }}", parts.join(" ,"))
        }
        Value::Array(items) => format!(
            "[ {} ]",
            items.iter().map(scrambled).collect::<Vec<_>>().join(" , ")
        ),
        other => other.to_string(),
    }
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::String),
        any::<i32>().prop_map(|n| json!(n)),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ]
}

fn arbitrary_payload() -> impl Strategy<Value = Map<String, Value>> {
    let extra = prop::collection::btree_map(
        "[a-z_]{1,12}",
        prop_oneof![
            leaf(),
            prop::collection::vec(leaf(), 0..4).prop_map(Value::Array)
        ],
        0..6,
    );
    (
        extra,
        "[ -~]{0,40}",
        2000i32..2100,
        1u8..13,
        1u8..29,
        0i64..5000,
    )
        .prop_map(|(extra, customer, year, month, day, span)| {
            let creation =
                Date::from_calendar_date(year, time::Month::try_from(month).expect("1..13"), day)
                    .expect("valid day");
            let mut map = payload(
                &creation.to_string(),
                &(creation + time::Duration::days(span)).to_string(),
            );
            map.insert("customer".into(), Value::String(customer));
            for (k, v) in extra {
                map.entry(k).or_insert(v);
            }
            map.remove("features");
            map
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sign_then_verify_holds(p in arbitrary_payload()) {
        let doc = signer().sign(p).expect("a well-formed payload signs");
        let verified = keys().verify_text(&doc.to_json()).expect("verifies");
        prop_assert_eq!(verified.key_id, signer().key_id());
        prop_assert_eq!(verified.document, doc);
    }

    #[test]
    fn whitespace_and_key_order_never_matter(p in arbitrary_payload()) {
        let doc = signer().sign(p).expect("signs");
        let text = scrambled(&doc.to_value());
        let verified = keys().verify_text(&text).expect("scrambled text verifies");
        prop_assert_eq!(verified.document, doc);
    }

    #[test]
    fn any_flipped_signature_bit_fails(p in arbitrary_payload(), bit in 0usize..512) {
        let doc = signer().sign(p).expect("signs");
        let mut signature = *doc.signature();
        signature[bit / 8] ^= 1 << (bit % 8);
        let tampered = LicenseDocument::from_parts(doc.payload().clone(), signature).expect("shape ok");
        prop_assert_eq!(keys().verify(&tampered).expect_err("tampered").code, ErrorCode::ValidationFail);
    }

    #[test]
    fn any_changed_payload_field_fails(p in arbitrary_payload(), pick in any::<prop::sample::Index>(), replacement in "[a-z]{0,8}") {
        let doc = signer().sign(p).expect("signs");
        let mut payload = doc.payload().clone();
        let key = payload.keys().nth(pick.index(payload.len())).expect("non-empty").clone();
        let changed = match &payload[&key] {
            Value::String(s) => Value::String(format!("{s}{replacement}x")),
            _ => Value::String(replacement),
        };
        payload.insert(key, changed);
        let tampered = LicenseDocument::from_parts(payload, *doc.signature()).expect("shape ok");
        prop_assert_eq!(keys().verify(&tampered).expect_err("tampered").code, ErrorCode::ValidationFail);
    }
}

// --- what one signature must pin down --------------------------------------------------

#[test]
fn a_name_twice_or_an_integer_beyond_2_53_is_refused_even_when_signed() {
    // Both integers have one canonical (double) form, so one signature covers both texts.
    let mut big = payload("2026-01-01", "2027-01-01");
    big.insert("seats_total".into(), json!(9_007_199_254_740_993u64));
    let signed = sign_raw(&big);
    let twin = signed.replace("9007199254740993", "9007199254740992");
    assert_ne!(signed, twin);
    for text in [&signed, &twin] {
        check_refused(text, ErrorCode::InvalidLicenseFormat, "beyond 2^53 - 1");
    }
    let mut negative = payload("2026-01-01", "2027-01-01");
    negative.insert("offset".into(), json!(-9_007_199_254_740_993i64));
    check_refused(
        &sign_raw(&negative),
        ErrorCode::InvalidLicenseFormat,
        "below -(2^53 - 1)",
    );

    // The largest exact integer, and a nested one, are fine.
    let mut exact = payload("2026-01-01", "2027-01-01");
    exact.insert("n".into(), json!(MAX_EXACT_INTEGER));
    exact.insert("nested".into(), json!({"list": [1, -2, 3.5]}));
    validate(&sign_raw(&exact), &keys(), noon(date!(2026 - 06 - 01))).expect("valid");

    // A payload field given twice: serde would keep the last, a reader might take the
    // first.
    let text = sign_raw(&payload("2026-01-01", "2027-01-01"));
    let twice = text.replacen(
        "\"customer\":",
        "\"customer\":\"Someone Else\",\"customer\":",
        1,
    );
    check_refused(
        &twice,
        ErrorCode::InvalidLicenseFormat,
        "`customer` is given twice",
    );
    // In an admin-API record holding the document, too.
    let record = json!({ "payload": twice }).to_string();
    check_refused(
        &record,
        ErrorCode::InvalidLicenseFormat,
        "`customer` is given twice",
    );
}

#[test]
fn an_integer_beyond_2_53_is_never_signed() {
    let mut big = payload("2026-01-01", "2027-01-01");
    big.insert("seats_total".into(), json!(9_007_199_254_740_993u64));
    let err = signer().sign(big).expect_err("refused");
    assert_eq!(err.code, ErrorCode::InvalidLicenseFormat);
    assert!(err.message.contains("beyond 2^53 - 1"), "{}", err.message);
}
