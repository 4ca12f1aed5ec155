//! Frame decoding: any byte stream yields frames, malformed bodies or an
//! oversized-frame error; never a panic, a hang or an allocation beyond the
//! frame limit.
#![no_main]

use bytes::BytesMut;
use kms_client::proto::{FrameCodec, Request, Response};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec: FrameCodec<Response, Request> = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
});
