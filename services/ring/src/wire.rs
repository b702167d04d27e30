//! The link protocol (**API Boundary**): after the TLS handshake each side
//! sends a [`Hello`] naming its protocol version, then [`Frame`]s. Every
//! frame is a 4-byte big-endian length and a postcard body; a length above
//! [`MAX_FRAME`] closes the link before anything is allocated for it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::topology::Report;

/// The ring protocol version this build speaks. A peer with another version
/// is refused (the TLS ALPN names it too, so the refusal comes at the handshake).
pub const PROTOCOL_VERSION: u32 = 1;

/// The TLS application protocol of the ring, carrying [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"sovereign-ring/1";

/// The largest frame a link accepts or sends, in bytes.
pub const MAX_FRAME: usize = 16 << 20;

/// The largest payload [`crate::Ring::send`] accepts (room left for the header).
pub const MAX_PAYLOAD: usize = MAX_FRAME - (64 << 10);

/// A class of ring traffic; each has its own subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Channel {
    /// Hidden states and tokens of distributed generation.
    Inference,
    /// Model bundles passed from node to node.
    Replication,
    /// Everything else between ring services (plans, requests, status).
    Control,
}

/// The first frame on a link, each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field: an incompatible peer's version is read from it.
    pub version: u32,
}

/// A frame after the [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Frame {
    /// Sent every heartbeat interval: the link and its peer are alive.
    Heartbeat,
    /// A member's view of its neighbours, flooded to every member.
    Report(Report),
    /// A message for a member, relayed when it is not a neighbour.
    Data(Data),
}

/// A message on its way to a member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Data {
    /// The sending member.
    pub from: String,
    /// The receiving member.
    pub to: String,
    /// The subscribers it is for.
    pub channel: Channel,
    /// Relays left before it is dropped (a guard against routing loops).
    pub hops_left: u8,
    /// The message.
    pub payload: Bytes,
}

/// The length-prefixed codec of every link, with the hard maximum.
pub(crate) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Why a peer's hello was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HelloError {
    /// The peer speaks another protocol version.
    #[error("peer speaks ring protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u32),
    /// The frame is not a hello at all.
    #[error("first frame is not a ring hello")]
    Garbage,
}

/// Checks a peer's first frame.
pub(crate) fn check_hello(frame: &[u8]) -> Result<(), HelloError> {
    match postcard::from_bytes::<Hello>(frame) {
        Ok(hello) if hello.version == PROTOCOL_VERSION => Ok(()),
        Ok(hello) => Err(HelloError::Version(hello.version)),
        Err(_) => match postcard::take_from_bytes::<u32>(frame) {
            Ok((version, _)) if version != PROTOCOL_VERSION => Err(HelloError::Version(version)),
            _ => Err(HelloError::Garbage),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn a_frame_claiming_4_gib_is_refused_before_allocation() {
        let mut codec = codec();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        assert!(codec.decode(&mut buf).is_err());
        assert!(
            buf.capacity() < 1024,
            "nothing was reserved for the claimed length"
        );
    }

    #[test]
    fn frames_round_trip_through_the_codec() {
        let frame = Frame::Data(Data {
            from: "a".into(),
            to: "c".into(),
            channel: Channel::Inference,
            hops_left: 3,
            payload: Bytes::from_static(b"hidden state"),
        });
        let mut codec = codec();
        let mut buf = BytesMut::new();
        codec
            .encode(Bytes::from(postcard::to_stdvec(&frame).unwrap()), &mut buf)
            .unwrap();
        let body = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(postcard::from_bytes::<Frame>(&body).unwrap(), frame);
    }

    #[test]
    fn hellos_are_checked_for_version_and_shape() {
        let ours = postcard::to_stdvec(&Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        assert_eq!(check_hello(&ours), Ok(()));
        let theirs = postcard::to_stdvec(&Hello { version: 7 }).unwrap();
        assert_eq!(check_hello(&theirs), Err(HelloError::Version(7)));
        assert_eq!(check_hello(&[]), Err(HelloError::Garbage));
    }
}
