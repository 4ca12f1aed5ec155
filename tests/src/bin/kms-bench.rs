//! `kms-bench`: wrap/unwrap latency and throughput of the real kmsd, next to
//! a bare echo server with the same framing measured in the same run.
//!
//! Run: `cargo run --release -p kms-tests --bin kms-bench [-- --secs N]
//! [--only etcd]`. Prints tables whose last column is measured / baseline.
//! kmsd runs with its Prometheus endpoint on, so the figures include
//! recording metrics. A second table puts the Kubernetes KMS v2 plugin
//! socket's Encrypt and Decrypt (gRPC, tonic client) beside wrap and unwrap
//! on kmsd's own socket, measured on the same daemon in the same run. The
//! etcd section (a 3-member etcd on loopback, Debian `etcd-server`) sets
//! daemons on the etcd store beside one on the file store: hot-path
//! throughput, rotation commit latency, and how long a rotation on one
//! daemon takes to be served by another.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use kms_client::client::Client;
use kms_client::proto::codec::Decoded;
use kms_client::proto::{Context, CreateKey, Frame, FrameCodec, Request, Response, PROTOCOL_VERSION};
use kms_tests::kubernetes::{self, v2, PluginClient};
use kms_tests::{free_tcp_addr, DaemonOptions, TestDaemon};
use tokio::net::UnixListener;
use tokio_util::codec::Framed;

const LATENCY_OPS: usize = 20_000;
const BATCH: usize = 1000;

#[derive(Clone, Copy)]
enum Op {
    Wrap,
    Unwrap,
}

/// What a benchmark talks to: the socket and the key and blob to use.
#[derive(Clone)]
struct Target {
    socket: PathBuf,
    key: String,
    blob: Vec<u8>,
}

impl Target {
    async fn connect(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    async fn once(&self, c: &Client, op: Op) {
        let ctx = Context::new();
        match op {
            Op::Wrap => drop(c.wrap(&self.key, &[7u8; 32], &ctx).await.expect("wrap")),
            Op::Unwrap => drop(c.unwrap(&self.blob, &ctx).await.expect("unwrap")),
        }
    }
}

/// p50 and p99 of one connection doing one request at a time, in µs.
async fn latency(t: &Target, op: Op) -> (f64, f64) {
    let c = t.connect().await;
    for _ in 0..1000 {
        t.once(&c, op).await;
    }
    let mut samples = Vec::with_capacity(LATENCY_OPS);
    for _ in 0..LATENCY_OPS {
        let start = Instant::now();
        t.once(&c, op).await;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
}

/// Requests per second with `conns` connections, each one request at a time.
async fn throughput(t: &Target, op: Op, conns: usize, secs: f64) -> f64 {
    let clients = futures::future::join_all((0..conns).map(|_| t.connect())).await;
    one_at_a_time(t, op, clients, secs).await
}

/// Requests per second with `depth` requests in flight on one connection.
async fn pipelined(t: &Target, op: Op, depth: usize, secs: f64) -> f64 {
    let c = t.connect().await;
    one_at_a_time(t, op, vec![c; depth], secs).await
}

/// One worker per entry of `clients` (the same connection may appear many
/// times), each sending `op` and waiting for its reply in a loop.
async fn one_at_a_time(t: &Target, op: Op, clients: Vec<Client>, secs: f64) -> f64 {
    let work = move |t: Target, c: Client| async move {
        t.once(&c, op).await;
        1
    };
    run_for(secs, clients, work, t).await
}

/// DEKs per second wrapped in batches of 1000 over `conns` connections.
async fn batched(t: &Target, conns: usize, secs: f64) -> f64 {
    let clients = futures::future::join_all((0..conns).map(|_| t.connect())).await;
    run_for(
        secs,
        clients,
        |t, c| async move {
            let deks = vec![[7u8; 32]; BATCH];
            let blobs = c.wrap_batch(&t.key, &deks, &Context::new()).await.expect("wrap batch");
            blobs.len() as u64
        },
        t,
    )
    .await
}

/// Runs one worker per client for `secs`, each looping on `work`; returns
/// the counted units per second.
async fn run_for<F, Fut>(secs: f64, clients: Vec<Client>, work: F, t: &Target) -> f64
where
    F: Fn(Target, Client) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = u64> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let (stop, count, t) = (stop.clone(), count.clone(), t.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    count.fetch_add(work(t.clone(), c.clone()).await, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("worker");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The physical baseline: same socket type, same codec, same request and
/// reply shapes, no keys and no crypto.
async fn echo_server(path: PathBuf) {
    let listener = UnixListener::bind(&path).expect("bind echo");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, FrameCodec::<Response, Request>::new(1 << 20));
            loop {
                // Like kmsd: reply to everything already buffered, flush when dry.
                let item = match framed.next().now_or_never() {
                    Some(item) => item,
                    None => {
                        if framed.flush().await.is_err() {
                            return;
                        }
                        framed.next().await
                    }
                };
                let Some(Ok(Decoded::Frame(Frame { id, body }))) = item else {
                    return;
                };
                if framed
                    .feed(Frame {
                        id,
                        body: echo_reply(body),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

fn echo_reply(req: Request) -> Response {
    match req {
        Request::Hello { .. } => Response::Hello {
            server: "echo".into(),
            protocol: PROTOCOL_VERSION,
            zone: "echo".into(),
        },
        Request::Wrap { dek, .. } => Response::Blob(vec![0; 33 + dek.len() + 16]),
        Request::Unwrap { blob, .. } => Response::Plaintext(vec![0; blob.len().saturating_sub(49)].into()),
        Request::WrapBatch { deks, .. } => Response::Blobs(deks.iter().map(|d| vec![0; 33 + d.len() + 16]).collect()),
        _ => Response::Done,
    }
}

struct Table(Vec<(String, f64, f64, &'static str)>);

impl Table {
    fn row(&mut self, name: impl Into<String>, kmsd: f64, base: f64, unit: &'static str) {
        let name = name.into();
        println!("  measured {name}: {kmsd:.1} {unit}, baseline {base:.1} {unit}");
        self.0.push((name, kmsd, base, unit));
    }

    fn print(&self) {
        self.print_as("kmsd", "echo baseline");
    }

    fn print_as(&self, what: &str, baseline: &str) {
        println!();
        println!("| measurement | {what} | {baseline} | unit | ratio |");
        println!("|---|---:|---:|---|---:|");
        for (name, k, b, unit) in &self.0 {
            println!("| {name} | {k:.1} | {b:.1} | {unit} | {:.2} |", k / b);
        }
    }
}

fn secs_arg() -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

async fn targets(daemon: &TestDaemon, echo_path: &Path) -> (Target, Target) {
    let c = Client::connect(&daemon.socket).await.expect("connect kmsd");
    let key = c
        .create_key(CreateKey {
            name: Some("bench".into()),
            ..Default::default()
        })
        .await
        .expect("create key");
    let key = key.id.to_string();
    let blob = c.wrap(&key, &[7u8; 32], &Context::new()).await.expect("wrap");
    let kmsd = Target {
        socket: daemon.socket.clone(),
        key: key.clone(),
        blob: blob.clone(),
    };
    let echo = Target {
        socket: echo_path.to_path_buf(),
        key,
        blob,
    };
    (kmsd, echo)
}

/// The echo server runs in its own process, like kmsd, so that both pay
/// the same cross-process wake-ups.
struct EchoProcess(std::process::Child);

impl EchoProcess {
    fn start(path: &Path) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let child = std::process::Command::new(exe)
            .arg("--echo-server")
            .arg(path)
            .spawn()
            .expect("start echo server");
        kms_tests::wait_for(Duration::from_secs(5), || path.exists().then_some(())).expect("echo server up");
        Self(child)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = args
        .iter()
        .position(|a| a == "--echo-server")
        .and_then(|i| args.get(i + 1))
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(echo_server(PathBuf::from(path)));
        return;
    }
    let secs = secs_arg();
    if args.iter().any(|a| a == "etcd") && args.iter().any(|a| a == "--only") {
        etcd_store(secs);
        return;
    }
    // Metrics on, as in production: recording must not cost throughput.
    // The benchmark opens up to 64 connections as one uid.
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("kms-v2.sock");
    let mut opts = DaemonOptions::with_metrics(free_tcp_addr());
    opts.extra_config.push_str("[limits]\nmax_connections_per_uid = 128\n");
    opts.extra_config
        .push_str(&format!("[kubernetes]\nsocket = {plugin:?}\nkey = \"bench\"\n"));
    let daemon = TestDaemon::start_with(opts);
    let echo_path = dir.path().join("echo.sock");
    let _echo = EchoProcess::start(&echo_path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (kmsd, echo) = targets(&daemon, &echo_path).await;
        println!("kms-bench: {secs} s per throughput figure, {LATENCY_OPS} requests per latency figure");
        let mut t = Table(Vec::new());
        for (op, name) in [(Op::Wrap, "wrap"), (Op::Unwrap, "unwrap")] {
            let (k50, k99) = latency(&kmsd, op).await;
            let (e50, e99) = latency(&echo, op).await;
            t.row(format!("{name} p50 latency, 1 connection"), k50, e50, "µs");
            t.row(format!("{name} p99 latency, 1 connection"), k99, e99, "µs");
            for conns in [1, 16, 64] {
                let k = throughput(&kmsd, op, conns, secs).await;
                let e = throughput(&echo, op, conns, secs).await;
                t.row(format!("{name} throughput, {conns} connections"), k, e, "req/s");
            }
            let k = pipelined(&kmsd, op, 64, secs).await;
            let e = pipelined(&echo, op, 64, secs).await;
            t.row(format!("{name} pipelined, 64 in flight on 1 connection"), k, e, "req/s");
        }
        let k = batched(&kmsd, 2, secs).await;
        let e = batched(&echo, 2, secs).await;
        t.row(format!("wrap batches of {BATCH}, 2 connections"), k, e, "DEKs/s");
        t.print();
        plugin_table(&plugin, &kmsd, secs)
            .await
            .print_as("plugin (gRPC)", "kmsd socket");
    });
    println!(
        "\nkmsd peak RSS: {} KiB",
        kms_tests::peak_rss_kib(daemon.pid().as_raw()).unwrap_or(0)
    );
    drop(daemon);
    replication_latency();
    etcd_store(secs);
}

/// Options of a daemon for the etcd section: many connections, and the
/// store given by `store` (empty: the file store).
fn bench_options(root: &Path, store: &str) -> DaemonOptions {
    let mut opts = DaemonOptions::with_metrics(free_tcp_addr());
    opts.zone = "bench".into();
    opts.root_key = Some(root.to_path_buf());
    opts.extra_config.push_str("[limits]\nmax_connections_per_uid = 128\n");
    opts.extra_config.push_str(store);
    opts
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (pct(0.5), pct(0.99), *samples.last().expect("samples"))
}

/// The etcd store beside the file store, in one run: the hot path
/// (throughput must be within noise: it never calls etcd), the commit of
/// a rotation (file: fsync + rename; etcd: a read and a transaction on a
/// 3-member cluster), and fleet visibility (rotate on daemon A until daemon
/// B serves the version; the issue's bound is 1 s).
fn etcd_store(secs: f64) {
    use kms_tests::etcd::{etcd_available, Etcd};
    if !etcd_available() {
        println!("\netcd store: etcd (Debian etcd-server) not installed; section skipped");
        return;
    }
    const KEYS: usize = 20;
    const ROTATIONS: usize = 10; // the manual rotation limit per key
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root-key");
    kms_tests::write_root_key(&root);
    let etcd = Etcd::cluster();
    let file = TestDaemon::start_with(bench_options(&root, ""));
    let a = TestDaemon::start_with(bench_options(&root, &etcd.store_toml(None)));
    let b = TestDaemon::start_with(bench_options(&root, &etcd.store_toml(None)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut t = Table(Vec::new());
    println!("\netcd store (3-member etcd on loopback) beside the file store, {secs} s per throughput figure:");
    // The two run in turns, ROUNDS times, and each row is the median of
    // its rounds: the machine's other load falls on both alike.
    const ROUNDS: usize = 3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    rt.block_on(async {
        let (on_file, _) = targets(&file, &file.socket).await;
        let (on_etcd, _) = targets(&a, &a.socket).await;
        for (op, name) in [(Op::Wrap, "wrap"), (Op::Unwrap, "unwrap")] {
            let (mut e, mut f) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                e.push(latency(&on_etcd, op).await.0);
                f.push(latency(&on_file, op).await.0);
            }
            t.row(format!("{name} p50 latency, 1 connection"), median(e), median(f), "µs");
            for conns in [1, 16] {
                let (mut e, mut f) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    e.push(throughput(&on_etcd, op, conns, secs).await);
                    f.push(throughput(&on_file, op, conns, secs).await);
                }
                let row = format!("{name} throughput, {conns} connections (median of {ROUNDS})");
                t.row(row, median(e), median(f), "req/s");
            }
        }
    });
    let commit = |d: &TestDaemon| -> Vec<f64> {
        let mut c = d.client();
        let mut samples = Vec::new();
        for k in 0..KEYS {
            let name = format!("commit{k}");
            c.create_key(CreateKey {
                name: Some(name.clone()),
                ..Default::default()
            })
            .expect("create");
            for _ in 0..ROTATIONS {
                let start = Instant::now();
                c.rotate_key(&name).expect("rotate");
                samples.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        samples
    };
    let (e50, e99, _) = percentiles(commit(&a));
    let (f50, f99, _) = percentiles(commit(&file));
    t.row(
        format!("rotation commit p50 ({} rotations)", KEYS * ROTATIONS),
        e50,
        f50,
        "ms",
    );
    t.row("rotation commit p99".to_string(), e99, f99, "ms");
    t.print_as("etcd store", "file store");

    let (mut ca, mut cb) = (a.client(), b.client());
    let mut samples = Vec::new();
    for k in 0..KEYS {
        let name = format!("seen{k}");
        ca.create_key(CreateKey {
            name: Some(name.clone()),
            ..Default::default()
        })
        .expect("create");
        while cb.describe_key(&name).is_err() {
            std::thread::sleep(Duration::from_micros(100));
        }
        for _ in 0..ROTATIONS {
            let start = Instant::now();
            let v = ca.rotate_key(&name).expect("rotate").expect("key info").active_version;
            while !cb.describe_key(&name).is_ok_and(|i| i.active_version >= v) {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "daemon B never served {name} v{v}"
                );
                std::thread::sleep(Duration::from_micros(100));
            }
            samples.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let n = samples.len();
    let (p50, p99, max) = percentiles(samples);
    let mut v = Table(Vec::new());
    v.row(
        format!("fleet visibility p50, rotate on A -> served by B ({n} rotations)"),
        p50,
        1000.0,
        "ms",
    );
    v.row("fleet visibility p99".to_string(), p99, 1000.0, "ms");
    v.row("fleet visibility max".to_string(), max, 1000.0, "ms");
    println!("\nFleet visibility (includes the rotation's own commit), against the issue's bound:");
    v.print_as("measured", "bound");
}

/// One call of the plugin: Encrypt a 32-byte DEK seed, or Decrypt what an
/// Encrypt returned.
async fn plugin_once(c: &mut PluginClient, op: Op, sealed: &v2::EncryptResponse) {
    match op {
        Op::Wrap => {
            let req = v2::EncryptRequest {
                plaintext: vec![7; 32],
                uid: "bench".into(),
            };
            drop(c.encrypt(req).await.expect("Encrypt"));
        }
        Op::Unwrap => {
            let req = v2::DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: "bench".into(),
                key_id: sealed.key_id.clone(),
                annotations: sealed.annotations.clone(),
            };
            drop(c.decrypt(req).await.expect("Decrypt"));
        }
    }
}

/// p50 and p99 of one plugin connection doing one call at a time, in µs.
async fn plugin_latency(path: &Path, op: Op, sealed: &v2::EncryptResponse) -> (f64, f64) {
    let mut c = kubernetes::connect(path).await.expect("connect plugin");
    for _ in 0..1000 {
        plugin_once(&mut c, op, sealed).await;
    }
    let mut samples = Vec::with_capacity(LATENCY_OPS);
    for _ in 0..LATENCY_OPS {
        let start = Instant::now();
        plugin_once(&mut c, op, sealed).await;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
}

/// Calls per second on `conns` plugin connections, one call at a time each.
async fn plugin_throughput(path: &Path, op: Op, conns: usize, secs: f64, sealed: &v2::EncryptResponse) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut c = kubernetes::connect(path).await.expect("connect plugin");
        let (stop, count, sealed) = (stop.clone(), count.clone(), sealed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                plugin_once(&mut c, op, &sealed).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("worker");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The plugin's Encrypt and Decrypt beside wrap and unwrap on kmsd's own
/// socket (the same key, the same daemon).
async fn plugin_table(path: &Path, kmsd: &Target, secs: f64) -> Table {
    let mut c = kubernetes::connect(path).await.expect("connect plugin");
    let status = c.status(v2::StatusRequest {}).await.expect("Status").into_inner();
    assert_eq!(status.healthz, "ok", "plugin Status");
    let req = v2::EncryptRequest {
        plaintext: vec![7; 32],
        uid: "bench".into(),
    };
    let sealed = c.encrypt(req).await.expect("Encrypt").into_inner();
    println!("\nkms-bench: Kubernetes KMS v2 plugin socket (tonic client) beside kmsd's socket");
    let mut t = Table(Vec::new());
    for (op, name, base) in [(Op::Wrap, "Encrypt", "wrap"), (Op::Unwrap, "Decrypt", "unwrap")] {
        let (p50, p99) = plugin_latency(path, op, &sealed).await;
        let (k50, k99) = latency(kmsd, op).await;
        t.row(format!("{name} (vs {base}) p50 latency, 1 connection"), p50, k50, "µs");
        t.row(format!("{name} (vs {base}) p99 latency, 1 connection"), p99, k99, "µs");
        let p = plugin_throughput(path, op, 16, secs, &sealed).await;
        let k = throughput(kmsd, op, 16, secs).await;
        t.row(format!("{name} (vs {base}) throughput, 16 connections"), p, k, "req/s");
    }
    t
}

/// Replication latency: from `key rotate` on zone a's daemon until zone
/// b's daemon serves the new version, over 20 keys × 10 manual rotations,
/// for zones peered over TCP with mutual TLS, next to the same between
/// zones peered over their Unix sockets (the baseline).
fn replication_latency() {
    const KEYS: usize = 20;
    const ROTATIONS: u32 = 10;
    let run = |tls: bool| -> Vec<f64> {
        use std::os::unix::fs::PermissionsExt;
        let site = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(site.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let sock = |z: &str| site.path().join(format!("{z}.sock"));
        let ca = kms_tests::pki::TestCa::new();
        let addrs = [free_tcp_addr(), free_tcp_addr()];
        // Over Unix sockets zone b's daemon runs as another uid (zones are
        // told apart by uid).
        const B_UID: u32 = 2201;
        let opts = |zone: &str, other: &str, i: usize| {
            let mut extra = "[replication]\npull_interval_secs = 3600\nretry_max_secs = 1\n".to_string();
            if tls {
                extra.push_str(&ca.issue(site.path(), zone).peering_toml(&addrs[i].to_string()));
                extra.push_str(&format!("[[peer]]\nzone = {other:?}\naddress = \"{}\"\n", addrs[1 - i]));
            } else {
                let uid = if zone == "a" { B_UID } else { 0 };
                extra.push_str(&format!(
                    "[[peer]]\nzone = {other:?}\nsocket = {:?}\nuid = {uid}\n",
                    sock(other)
                ));
            }
            DaemonOptions {
                zone: zone.into(),
                extra_config: extra,
                socket: Some(sock(zone)),
                run_as: (!tls && zone == "b").then_some(B_UID),
                ..DaemonOptions::default()
            }
        };
        let a = TestDaemon::start_with(opts("a", "b", 0));
        let b = TestDaemon::start_with(opts("b", "a", 1));
        std::fs::set_permissions(sock("a"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut ca_ = a.client();
        let mut cb = b.client();
        let mut samples = Vec::new();
        for k in 0..KEYS {
            let name = format!("k{k}");
            ca_.create_key(CreateKey {
                name: Some(name.clone()),
                ..Default::default()
            })
            .expect("create");
            ca_.replicate_key(&name, "b").expect("replicate");
            for _ in 0..ROTATIONS {
                let start = Instant::now();
                let v = ca_.rotate_key(&name).expect("rotate").expect("key info").active_version;
                loop {
                    if cb.describe_key(&name).map(|i| i.active_version >= v).unwrap_or(false) {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "zone b never got {name} v{v}"
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                samples.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        samples.sort_by(f64::total_cmp);
        samples
    };
    let pct = |s: &[f64], p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)];
    let tls = run(true);
    let unix = run(false);
    let mut t = Table(Vec::new());
    t.row(
        format!("replication p50, rotate in a -> served in b ({} rotations)", tls.len()),
        pct(&tls, 0.50),
        pct(&unix, 0.50),
        "ms",
    );
    t.row("replication p99".to_string(), pct(&tls, 0.99), pct(&unix, 0.99), "ms");
    println!("\nReplication latency, zones over TCP with mutual TLS vs over their Unix sockets:");
    t.print_as("TCP + mTLS", "Unix sockets");
}
