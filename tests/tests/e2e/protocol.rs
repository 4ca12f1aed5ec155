//! The wire protocol against the real daemon: handshake, pipelining,
//! malformed and oversized frames, idle and half-sent clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kms_client::blocking::BlockingClient;
use kms_client::proto::codec::{decode_body, encode_body, Decoded};
use kms_client::proto::{Context, CreateKey, ErrorCode, Frame, Request, Response, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use kms_tests::TestDaemon;

/// A raw connection speaking frames by hand.
struct Raw(UnixStream);

impl Raw {
    fn connect(d: &TestDaemon) -> Self {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    fn hello(d: &TestDaemon) -> Self {
        let mut r = Self::connect(d);
        r.send(
            0,
            Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: "raw".into(),
            },
        );
        assert!(matches!(r.recv().body, Response::Hello { .. }));
        r
    }

    fn send_bytes(&mut self, body: &[u8]) {
        self.0.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        self.0.write_all(body).unwrap();
    }

    fn send(&mut self, id: u64, body: Request) {
        self.send_bytes(&encode_body(&Frame { id, body }).unwrap());
    }

    /// Reads one frame; `None` at end of stream.
    fn try_recv(&mut self) -> Option<Frame<Response>> {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut body).unwrap();
        match decode_body::<Response>(&body) {
            Decoded::Frame(f) => Some(f),
            Decoded::Malformed { reason, .. } => panic!("daemon sent an undecodable frame: {reason}"),
        }
    }

    fn recv(&mut self) -> Frame<Response> {
        self.try_recv().expect("a reply")
    }
}

fn error_code(r: &Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn pipelined_requests_are_answered_in_order_with_their_ids() {
    let d = TestDaemon::start();
    let mut c = d.client();
    let key = c
        .create_key(CreateKey {
            name: Some("pipe".into()),
            ..Default::default()
        })
        .unwrap();
    let mut raw = Raw::hello(&d);
    // 1000 requests in flight before reading any reply; ids not sequential.
    let ids: Vec<u64> = (0..1000u64).map(|i| i * 7919 + 3).collect();
    let mut all = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let body = encode_body(&Frame {
            id: *id,
            body: request_for(i, &key.id.to_string()),
        })
        .unwrap();
        all.extend_from_slice(&(body.len() as u32).to_be_bytes());
        all.extend_from_slice(&body);
    }
    raw.0.write_all(&all).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let f = raw.recv();
        assert_eq!(f.id, *id, "reply {i} out of order");
        match (i.is_multiple_of(3), f.body) {
            (true, r) => assert_eq!(error_code(&r), ErrorCode::NotFound),
            (false, Response::Blob(b)) => {
                assert_eq!(&c.unwrap(&b, &Context::new()).unwrap()[..], &[i as u8; 32]);
            }
            (false, other) => panic!("unexpected {other:?}"),
        }
    }
}

/// Every third request fails (unknown key), the others wrap a distinct DEK.
fn request_for(i: usize, key: &str) -> Request {
    if i.is_multiple_of(3) {
        Request::DescribeKey { key: "missing".into() }
    } else {
        Request::Wrap {
            key: key.to_string(),
            dek: vec![i as u8; 32].into(),
            context: Context::new(),
        }
    }
}

#[test]
fn malformed_frame_gets_malformed_and_the_connection_survives() {
    let d = TestDaemon::start();
    let mut raw = Raw::hello(&d);
    // id 42 as a varint, then an unknown request tag.
    raw.send_bytes(&[42, 0xff, 0xff, 0x01]);
    let f = raw.recv();
    assert_eq!(f.id, 42);
    assert_eq!(error_code(&f.body), ErrorCode::Malformed);
    raw.send_bytes(&[]);
    assert_eq!(error_code(&raw.recv().body), ErrorCode::Malformed);
    raw.send(43, Request::Status);
    let f = raw.recv();
    assert_eq!(f.id, 43);
    assert!(matches!(f.body, Response::Status(_)), "connection still usable");
}

#[test]
fn oversized_frame_gets_an_error_and_that_connection_closes() {
    let d = TestDaemon::start();
    let mut raw = Raw::hello(&d);
    raw.0
        .write_all(&((DEFAULT_MAX_FRAME + 1) as u32).to_be_bytes())
        .unwrap();
    // The daemon may close before these bytes are written (EPIPE): fine.
    let _ = raw.0.write_all(&[0u8; 1024]);
    let f = raw.recv();
    assert_eq!(error_code(&f.body), ErrorCode::Malformed);
    assert!(raw.try_recv().is_none(), "connection closed after an oversized frame");
    // Others are not disturbed.
    d.client().status().unwrap();
}

#[test]
fn first_request_must_be_hello_and_unknown_protocol_is_refused() {
    let d = TestDaemon::start();
    let mut raw = Raw::connect(&d);
    raw.send(1, Request::Status);
    assert_eq!(error_code(&raw.recv().body), ErrorCode::Malformed);
    raw.send(
        2,
        Request::Hello {
            protocol: PROTOCOL_VERSION + 1,
            client: "future".into(),
        },
    );
    let f = raw.recv();
    assert_eq!(error_code(&f.body), ErrorCode::UnsupportedProtocol);
    assert!(raw.try_recv().is_none());
}

#[test]
fn silent_and_half_sent_clients_block_no_one() {
    // More connections than one uid may hold by default (see limits.rs).
    let d = TestDaemon::start_with(kms_tests::DaemonOptions::default().many_connections());
    // Many clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..50).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    // One that sends half a frame and stays.
    let mut half = Raw::hello(&d);
    half.0.write_all(&100u32.to_be_bytes()).unwrap();
    half.0.write_all(&[1, 2, 3]).unwrap();
    // One that sends half a frame and disconnects.
    let mut gone = Raw::hello(&d);
    gone.0.write_all(&100u32.to_be_bytes()).unwrap();
    drop(gone);
    let mut c = BlockingClient::connect(&d.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..20 {
        c.status().unwrap();
    }
    // Accepting 50 connections may lag behind on a loaded machine: poll.
    let all = kms_tests::wait_for(Duration::from_secs(10), || {
        (c.status().ok()?.connections >= 50).then_some(())
    });
    assert!(all.is_some(), "the daemon holds the 50 idle connections");
    drop(idle);
}

#[test]
fn sigterm_answers_requests_already_sent() {
    let mut d = TestDaemon::start();
    let mut raw = Raw::hello(&d);
    let mut all = Vec::new();
    for id in 1..=200u64 {
        let body = encode_body(&Frame {
            id,
            body: Request::Status,
        })
        .unwrap();
        all.extend_from_slice(&(body.len() as u32).to_be_bytes());
        all.extend_from_slice(&body);
    }
    raw.0.write_all(&all).unwrap();
    // Wait for the first reply so the daemon has the frames, then stop it.
    assert_eq!(raw.recv().id, 1);
    let status = d.terminate();
    assert!(status.success());
    let mut last = 1;
    while let Some(f) = raw.try_recv() {
        assert_eq!(f.id, last + 1);
        last = f.id;
    }
    assert_eq!(last, 200, "every request sent before SIGTERM was answered");
}
