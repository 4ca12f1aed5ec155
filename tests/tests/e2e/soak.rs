//! Load and soak: 64 clients with mixed operations for a fixed time while
//! stalled clients (never reading their replies) and a slow one (one byte at
//! a time) are connected. Reports ops/s and errors (must be 0), and samples
//! kmsd's RSS and open fds, which must stay flat after warm-up.
//!
//! `KMS_SOAK_SECS` (default 4) sets the duration.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::proto::codec::encode_body;
use kms_client::proto::{Context, CreateKey, Frame, Request, PROTOCOL_VERSION};
use kms_tests::TestDaemon;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn frame(id: u64, body: Request) -> Vec<u8> {
    let b = encode_body(&Frame { id, body }).unwrap();
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend(b);
    out
}

/// Connects, greets, then floods requests without ever reading a reply,
/// until its socket buffer is full and writes block.
fn stalled_client(socket: std::path::PathBuf, stop: Arc<AtomicBool>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let _ = s.write_all(&frame(
        0,
        Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: "stalled".into(),
        },
    ));
    let req = frame(1, Request::ListKeys);
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(&req).is_err() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends a frame one byte every 50 ms.
fn slow_client(socket: std::path::PathBuf, stop: Arc<AtomicBool>) {
    let mut s = UnixStream::connect(socket).unwrap();
    let bytes = frame(
        0,
        Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: "slow".into(),
        },
    );
    for b in bytes.iter().cycle() {
        if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn worker(d: &TestDaemon, key: String, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>, errors: Arc<AtomicU64>) {
    let mut c = d.client();
    let ctx = Context::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let ok = match i % 4 {
            0 => c.describe_key(&key).is_ok(),
            1 => c.generate_data_key(&key, &ctx, true).is_ok(),
            _ => match c.wrap(&key, &i.to_le_bytes().repeat(4), &ctx) {
                Ok(blob) => c
                    .unwrap(&blob, &ctx)
                    .is_ok_and(|p| p[..] == i.to_le_bytes().repeat(4)[..]),
                Err(_) => false,
            },
        };
        if ok {
            ops.fetch_add(1, Ordering::Relaxed);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn sixty_four_clients_with_stalled_ones_keep_memory_and_fds_flat() {
    let secs: u64 = std::env::var("KMS_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    // 64 clients and stalled ones, as one uid: more than [limits] allow by default.
    let d = TestDaemon::start_with(kms_tests::DaemonOptions::default().many_connections());
    let pid = d.pid().as_raw();
    let key = d
        .client()
        .create_key(CreateKey {
            name: Some("soak".into()),
            ..Default::default()
        })
        .unwrap()
        .id
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (ops, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let (s, st) = (d.socket.clone(), stop.clone());
            scope.spawn(move || stalled_client(s, st));
        }
        let (s, st) = (d.socket.clone(), stop.clone());
        scope.spawn(move || slow_client(s, st));
        for _ in 0..64 {
            let (k, st, o, e, d) = (key.clone(), stop.clone(), ops.clone(), errors.clone(), &d);
            scope.spawn(move || worker(d, k, st, o, e));
        }
        // Sample RSS and fds; the first quarter is warm-up.
        let start = Instant::now();
        let mut samples = Vec::new();
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(100));
            samples.push((
                start.elapsed().as_secs_f64(),
                rss_kib(pid),
                fds(pid),
                ops.load(Ordering::Relaxed),
            ));
        }
        stop.store(true, Ordering::Relaxed);
        report_and_check(&samples, secs, errors.load(Ordering::Relaxed));
    });
}

fn report_and_check(samples: &[(f64, u64, usize, u64)], secs: u64, errors: u64) {
    let warm = samples.len() / 4;
    let steady = &samples[warm..];
    let (rss0, fd0) = (steady[0].1, steady[0].2);
    let rss_max = steady.iter().map(|s| s.1).max().unwrap();
    let fd_max = steady.iter().map(|s| s.2).max().unwrap();
    let total = samples.last().unwrap().3;
    let ops_per_sec = (total - steady[0].3) as f64 / (samples.last().unwrap().0 - steady[0].0);
    println!("soak: {secs} s, 64 clients + 8 stalled + 1 slow: {total} ops, {ops_per_sec:.0} ops/s after warm-up, {errors} errors");
    println!("soak: RSS after warm-up {rss0} KiB, max {rss_max} KiB; fds after warm-up {fd0}, max {fd_max}");
    for s in samples.iter().step_by((samples.len() / 8).max(1)) {
        println!("soak:   t={:5.1}s rss={} KiB fds={} ops={}", s.0, s.1, s.2, s.3);
    }
    assert_eq!(errors, 0, "no operation may fail under load");
    // Stalled clients must not hold up the others: after warm-up, every
    // sampling interval saw operations complete (progress, not a rate).
    for pair in steady.windows(2) {
        assert!(
            pair[1].3 > pair[0].3,
            "no operation completed between t={:.1}s and t={:.1}s",
            pair[0].0,
            pair[1].0
        );
    }
    assert!(
        rss_max <= rss0 + rss0 / 4 + 4096,
        "RSS grew from {rss0} to {rss_max} KiB after warm-up"
    );
    assert!(fd_max <= fd0 + 2, "open fds grew from {fd0} to {fd_max} after warm-up");
}
