//! Frame codec: u32 big-endian length prefix (tokio-util
//! `LengthDelimitedCodec`) around a postcard-encoded [`Frame`].
//!
//! The codec is free of I/O: it works on `BytesMut` and is tested that way.
//! A body that does not decode is *not* a stream error: it is returned as
//! [`Decoded::Malformed`] with the frame id when one can be read, so that the
//! server can answer `malformed` and keep the connection. A frame longer than
//! the limit is a stream error ([`CodecError::Oversized`]): the peer cannot be
//! resynchronised, so the connection ends.

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

use super::Frame;

/// Errors that end a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of more than {max} bytes")]
    Oversized { max: usize },
    #[error("cannot encode frame")]
    Encode(#[source] postcard::Error),
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

/// One decoded frame: well-formed, or a body that does not decode.
#[derive(Debug)]
pub enum Decoded<T> {
    Frame(Frame<T>),
    /// The body did not decode; `id` is the frame id if its first field
    /// could be read, else 0.
    Malformed {
        id: u64,
        reason: String,
    },
}

/// Encodes `Frame<E>` and decodes `Frame<D>`, with a maximum frame length
/// enforced in both directions.
#[derive(Debug)]
pub struct FrameCodec<E, D> {
    inner: LengthDelimitedCodec,
    max: usize,
    _types: PhantomData<fn(E) -> D>,
    /// A length prefix has been read and its body has not: the inner
    /// codec has taken the prefix out of the buffer, so the buffer alone
    /// cannot tell.
    in_frame: bool,
}

impl<E, D> FrameCodec<E, D> {
    /// A codec refusing frames longer than `max` bytes (body, without the
    /// 4-byte length prefix).
    pub fn new(max: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .max_frame_length(max)
            .new_codec();
        Self {
            inner,
            max,
            in_frame: false,
            _types: PhantomData,
        }
    }

    /// The configured limit.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Whether a frame has begun (its length prefix read) and not ended.
    pub fn in_frame(&self) -> bool {
        self.in_frame
    }
}

/// Reads the frame id (the first field, a postcard varint) from a body that
/// may not decode as a whole.
pub fn decode_frame_id(body: &[u8]) -> Option<u64> {
    postcard::take_from_bytes::<u64>(body).ok().map(|(id, _)| id)
}

/// Encodes one frame body (without length prefix).
///
/// # Errors
/// Fails only if serialization fails.
pub fn encode_body<T: Serialize>(frame: &Frame<T>) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(frame).map_err(CodecError::Encode)
}

/// Decodes one frame body (without length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Decoded<T> {
    match postcard::from_bytes::<Frame<T>>(body) {
        Ok(frame) => Decoded::Frame(frame),
        Err(e) => Decoded::Malformed {
            id: decode_frame_id(body).unwrap_or(0),
            reason: e.to_string(),
        },
    }
}

impl<E: Serialize, D> Encoder<Frame<E>> for FrameCodec<E, D> {
    type Error = CodecError;

    fn encode(&mut self, item: Frame<E>, dst: &mut BytesMut) -> Result<(), CodecError> {
        let body = encode_body(&item)?;
        if body.len() > self.max {
            return Err(CodecError::Oversized { max: self.max });
        }
        self.inner.encode(Bytes::from(body), dst).map_err(CodecError::Io)
    }
}

impl<E, D: DeserializeOwned> Decoder for FrameCodec<E, D> {
    type Item = Decoded<D>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded<D>>, CodecError> {
        let before = src.len();
        match self.inner.decode(src) {
            Ok(Some(body)) => {
                self.in_frame = false;
                Ok(Some(decode_body(&body)))
            }
            Ok(None) => {
                if src.len() < before {
                    self.in_frame = true;
                }
                Ok(None)
            }
            Err(e) if is_too_long(&e) => Err(CodecError::Oversized { max: self.max }),
            Err(e) => Err(CodecError::Io(e)),
        }
    }
}

fn is_too_long(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Request, Response};

    #[test]
    fn a_frame_in_progress_is_seen_after_its_prefix_alone() {
        let mut c = FrameCodec::<Response, Request>::new(1 << 20);
        let mut buf = BytesMut::from(&1000u32.to_be_bytes()[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert!(
            buf.is_empty() && c.in_frame(),
            "the prefix is consumed, the frame has begun"
        );
        let mut whole = BytesMut::new();
        let mut enc = FrameCodec::<Request, Response>::new(1 << 20);
        enc.encode(
            Frame {
                id: 1,
                body: Request::Status,
            },
            &mut whole,
        )
        .unwrap();
        let mut c = FrameCodec::<Response, Request>::new(1 << 20);
        assert!(c.decode(&mut whole).unwrap().is_some());
        assert!(!c.in_frame());
    }

    fn server_codec(max: usize) -> FrameCodec<Response, Request> {
        FrameCodec::new(max)
    }

    fn client_codec(max: usize) -> FrameCodec<Request, Response> {
        FrameCodec::new(max)
    }

    #[test]
    fn round_trips_a_request() {
        let mut buf = BytesMut::new();
        let req = Frame {
            id: 7,
            body: Request::Status,
        };
        client_codec(1024).encode(req.clone(), &mut buf).unwrap();
        assert_eq!(&buf[..4], &(buf.len() as u32 - 4).to_be_bytes());
        match server_codec(1024).decode(&mut buf).unwrap() {
            Some(Decoded::Frame(f)) => assert_eq!(f, req),
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut full = BytesMut::new();
        client_codec(1024)
            .encode(
                Frame {
                    id: 1,
                    body: Request::ListKeys,
                },
                &mut full,
            )
            .unwrap();
        let mut codec = server_codec(1024);
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert!(codec.decode(&mut part).unwrap().is_none());
        part.extend_from_slice(&full[full.len() - 1..]);
        assert!(matches!(codec.decode(&mut part).unwrap(), Some(Decoded::Frame(_))));
    }

    #[test]
    fn garbage_body_is_malformed_with_its_id() {
        let mut buf = BytesMut::new();
        // id 300 as a varint, then an enum tag that does not exist.
        let body = [0xac, 0x02, 0xff, 0xff, 0xff];
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        match server_codec(1024).decode(&mut buf).unwrap() {
            Some(Decoded::Malformed { id, .. }) => assert_eq!(id, 300),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn empty_body_is_malformed_id_zero() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            server_codec(1024).decode(&mut buf).unwrap(),
            Some(Decoded::Malformed { id: 0, .. })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_on_decode() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&2000u32.to_be_bytes());
        buf.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            server_codec(1024).decode(&mut buf),
            Err(CodecError::Oversized { max: 1024 })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_on_encode() {
        let mut buf = BytesMut::new();
        let req = Frame {
            id: 1,
            body: Request::Encrypt {
                key: "k".into(),
                plaintext: vec![0; 2048].into(),
                context: Default::default(),
            },
        };
        assert!(matches!(
            client_codec(1024).encode(req, &mut buf),
            Err(CodecError::Oversized { .. })
        ));
        assert!(buf.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut codec = server_codec(256);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        /// Frames with a valid length prefix around arbitrary bodies (so
        /// the body decoder really runs): each is one `Frame` or one
        /// `Malformed`, never a stream error or a panic, and the buffer is
        /// consumed exactly.
        #[test]
        fn valid_prefixes_around_arbitrary_bodies_decode_one_by_one(
            bodies in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 1..8),
        ) {
            let mut buf = BytesMut::new();
            for body in &bodies {
                buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
                buf.extend_from_slice(body);
            }
            let mut codec = server_codec(256);
            for body in &bodies {
                match codec.decode(&mut buf) {
                    Ok(Some(Decoded::Malformed { id, .. })) => {
                        proptest::prop_assert_eq!(id, decode_frame_id(body).unwrap_or(0));
                    }
                    Ok(Some(Decoded::Frame(_))) => {}
                    other => proptest::prop_assert!(false, "{other:?}"),
                }
            }
            proptest::prop_assert!(buf.is_empty());
        }

        /// Real requests with one body byte changed still come out as one
        /// frame or one malformed body, with the length prefix intact.
        #[test]
        fn mutated_valid_frames_stay_framed(at in proptest::num::usize::ANY, value in proptest::num::u8::ANY) {
            let mut full = BytesMut::new();
            let req = Frame {
                id: 77,
                body: Request::Encrypt {
                    key: "key".into(),
                    plaintext: b"data".to_vec().into(),
                    context: [("a".to_string(), "b".to_string())].into(),
                },
            };
            client_codec(1024).encode(req, &mut full).unwrap();
            let at = 4 + at % (full.len() - 4);
            full[at] = value;
            let mut codec = server_codec(1024);
            let got = codec.decode(&mut full);
            proptest::prop_assert!(matches!(got, Ok(Some(_))), "{got:?}");
            proptest::prop_assert!(full.is_empty());
        }
    }
}
