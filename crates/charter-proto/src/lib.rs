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

/// The codec of the control plane's `Sync` streams: prost's, with buffers sized for this
/// protocol's messages (a snapshot is about a kilobyte, an Ack or a Ping tens of bytes)
/// instead of tonic's 8 KiB per direction. A stream is held open per data plane, so these
/// buffers are per data plane; a larger message grows its buffer as usual.
#[derive(Debug, Clone)]
pub struct StreamCodec<T, U>(std::marker::PhantomData<(T, U)>);

/// The initial buffer capacity of each direction of a `Sync` stream.
pub const STREAM_BUFFER_SIZE: usize = 2048;

impl<T, U> Default for StreamCodec<T, U> {
    fn default() -> Self {
        StreamCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for StreamCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(Self::settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Self::settings())
    }
}

impl<T, U> StreamCodec<T, U> {
    fn settings() -> tonic::codec::BufferSettings {
        // tonic's own default yield threshold (32 KiB): how much a stream encodes
        // before it lets the connection write.
        tonic::codec::BufferSettings::new(STREAM_BUFFER_SIZE, 32 * 1024)
    }
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
