//! The messages a control plane decodes from a data plane's `Sync` stream
//! (`DataPlaneMessage`, prost), and the checks the cluster server applies to a `Hello`
//! before it records the data plane: the node id and the version.
//!
//! Beyond "never panics", it checks:
//! - a decoded message encodes to bytes that decode to the same message;
//! - a node id taken is 1 to 128 printable ASCII characters with no space, so it is safe
//!   to log, to store and to show in the inventory;
//! - a version the control plane takes reads as MAJOR.MINOR.

#![no_main]

use charter_cp::fuzzing::{compatible, valid_node_id, VERSION};
use charter_proto::v1::{data_plane_message::Msg, DataPlaneMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = DataPlaneMessage::decode(data) else {
        return;
    };
    let again = DataPlaneMessage::decode(message.encode_to_vec().as_slice())
        .expect("a re-encoded message decodes");
    assert_eq!(again, message);
    match message.msg {
        Some(Msg::Hello(hello)) => {
            if valid_node_id(&hello.node_id) {
                assert!((1..=128).contains(&hello.node_id.len()));
                assert!(hello.node_id.bytes().all(|b| b.is_ascii_graphic()));
            }
            if compatible(VERSION, &hello.version).is_ok() {
                let mut parts = hello.version.split(['.', '-', '+']);
                let major = parts.next().map(str::parse::<u64>);
                let minor = parts.next().map(str::parse::<u64>);
                assert!(
                    matches!((major, minor), (Some(Ok(_)), Some(Ok(_)))),
                    "version {:?} taken",
                    hello.version
                );
            }
            // The same check with the data plane's version on both sides: never a panic.
            let _ = compatible(&hello.version, &hello.version);
        }
        // An Ack's and a Ping's fields are only stored; a Telemetry's buckets are checked
        // by a private function of the cluster server, not reached from here.
        Some(Msg::Ack(_) | Msg::Telemetry(_) | Msg::Ping(_)) | None => {}
    }
});
