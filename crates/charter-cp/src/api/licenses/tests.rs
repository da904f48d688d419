//! The cached encodings are the bytes serde_json writes for the API shapes.

use charter_store::LicenseRecord;
use uuid::Uuid;

use super::{page_body, record_body, record_json, ApiPage, ApiRecord};

fn record(n: u8, payload: &str) -> LicenseRecord {
    LicenseRecord {
        id: Uuid::from_bytes([n; 16]),
        payload: payload.to_owned(),
        checksum: format!("{n:064x}"),
        created_at: 1_700_000_000 + i64::from(n),
        updated_at: -5,
        revision: u64::from(n),
    }
}

#[test]
fn pages_and_records_are_serde_json_byte_for_byte() {
    let records = [
        record(
            1,
            r#"{"license":{"payload":{"a":"\"quoted\" \\ </x> é 😀 \u0001"}}}"#,
        ),
        record(2, ""),
        record(3, "plain"),
    ];
    for record in &records {
        assert_eq!(
            record_body(record),
            serde_json::to_vec(&record_json(record)).unwrap()
        );
    }
    let bodies: Vec<_> = records.iter().map(record_body).collect();
    let pages = [
        (0, None, None),
        (1, Some("/licenses?offset=AQEB&size=1"), Some("AQEB")),
        (3, None, None),
    ];
    for (n, next, offset) in pages {
        let expected = serde_json::to_vec(&ApiPage {
            data: records[..n].iter().map(ApiRecord).collect(),
            next: next.map(str::to_owned),
            offset: offset.map(str::to_owned),
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(page_body(&bodies[..n], next, offset).to_vec()).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }
    // Kong's empty list, byte for byte: `offset` only comes with a next page.
    assert_eq!(
        &page_body(&[], None, None)[..],
        br#"{"data":[],"next":null}"#
    );
}
