//! The cluster protocol (`proto/charter/cluster/v1/cluster.proto`), generated at build
//! time, plus [`EncodedControlPlaneMessage`]: a control-plane message encoded once and
//! shared by every stream.

#![allow(missing_docs)]

use bytes::{BufMut, Bytes};
use prost::Message;

/// The protocol as generated: messages, the client and an ordinary server.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/plain/charter.cluster.v1.rs"));
}

/// The server whose stream items are [`EncodedControlPlaneMessage`]s. The control plane
/// serves this one, so a snapshot is serialised once however many data planes listen.
pub mod shared {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/shared/charter.cluster.v1.rs"));
}

/// A `ControlPlaneMessage` already encoded. Cloning shares the bytes (a reference count),
/// and "encoding" it again copies them verbatim into the frame: no serialisation per stream.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncodedControlPlaneMessage(Bytes);

impl EncodedControlPlaneMessage {
    /// Encodes a message once.
    pub fn new(message: &v1::ControlPlaneMessage) -> EncodedControlPlaneMessage {
        EncodedControlPlaneMessage(Bytes::from(message.encode_to_vec()))
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::fmt::Debug for EncodedControlPlaneMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedControlPlaneMessage({} bytes)", self.0.len())
    }
}

impl Message for EncodedControlPlaneMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only ever sent by the server, never decoded: skip whatever arrives.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_message_is_byte_identical_to_the_message() {
        let message = v1::ControlPlaneMessage {
            msg: Some(v1::control_plane_message::Msg::Snapshot(v1::Snapshot {
                epoch: "e".into(),
                revision: 7,
                license: Some(v1::License {
                    id: "id".into(),
                    payload: "{}".into(),
                    created_at: 1,
                    updated_at: 2,
                }),
            })),
        };
        let encoded = EncodedControlPlaneMessage::new(&message);
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        let decoded =
            v1::ControlPlaneMessage::decode(encoded.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, message);
    }
}
