//! Test harness: builds and starts the real `kmsd` binary on a temporary
//! socket with its own state directory and root key, runs `kmsctl` as a
//! subprocess, and cleans up on drop.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kms_client::blocking::BlockingClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub mod etcd;
pub mod kubernetes;
pub mod lazyfs;
pub mod pki;

/// Where the workspace's binaries are, built fresh once per test process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>
        let mut dir = exe.parent().expect("target dir").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        build_binaries(&dir);
        dir
    })
}

/// Builds kmsd and kmsctl when running under cargo (`cargo test`, `cargo
/// run`), so that tests never use stale binaries; a binary started directly
/// uses the ones beside it.
///
/// kmsd is built with its `test-faults` feature (fault points the crash
/// tests set through `KMSDTEST_FAULT`), so `target/<profile>/kmsd` is a test
/// build after a test or benchmark run. A production kmsd is built without
/// it: `cargo install --path daemon` (README, "Running under systemd").
fn build_binaries(dir: &Path) {
    let Ok(cargo) = std::env::var("CARGO") else {
        assert!(
            dir.join("kmsd").exists(),
            "no kmsd beside {}; build it first: cargo build --bins -p kmsd -p kms-client --features kmsd/test-faults",
            dir.display()
        );
        return;
    };
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.args([
        "build",
        "--bins",
        "-p",
        "kmsd",
        "-p",
        "kms-client",
        "--features",
        "kmsd/test-faults",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build of kmsd and kmsctl failed");
}

/// Path of a workspace binary (`kmsd`, `kmsctl`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Settings for a test daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub zone: String,
    /// Extra TOML appended to the generated config.
    pub extra_config: String,
    /// Extra environment for the daemon.
    pub env: Vec<(String, String)>,
    /// Socket path; default `kmsd.sock` in the daemon's own folder. Set it
    /// when other daemons must know the path before this one starts.
    pub socket: Option<PathBuf>,
    /// `RLIMIT_NOFILE` (soft and hard) of the daemon; default inherited.
    pub nofile: Option<u64>,
    /// The key store's folder; default `state` in the daemon's own folder.
    /// The power-loss tests put it on a [`lazyfs::LazyFs`].
    pub state_dir: Option<PathBuf>,
    /// The backing folder of [`TestDaemon::start_with_mount`]; default
    /// `data` in the daemon's own folder.
    pub data_dir: Option<PathBuf>,
    /// Run the daemon as this uid (and gid) instead of the test's own;
    /// its folder is handed to that uid. For zones told apart by uid.
    pub run_as: Option<u32>,
    /// The root key file; default a fresh one in the daemon's own folder.
    /// The daemons of an etcd fleet share one.
    pub root_key: Option<PathBuf>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            zone: "test".into(),
            extra_config: String::new(),
            env: Vec::new(),
            socket: None,
            nofile: None,
            state_dir: None,
            data_dir: None,
            run_as: None,
            root_key: None,
        }
    }
}

impl DaemonOptions {
    /// Default options with the Prometheus endpoint on `addr` (through the
    /// environment: the generated config turns metrics off).
    /// Lets one uid hold up to 512 connections (`[limits]` allow 32 by
    /// default), for tests of something else that open many as root.
    pub fn many_connections(mut self) -> Self {
        self.env
            .push(("KMSD_LIMITS__MAX_CONNECTIONS_PER_UID".into(), "512".into()));
        self.env.push(("KMSD_LIMITS__MAX_CONNECTIONS".into(), "1024".into()));
        self
    }

    pub fn with_metrics(addr: std::net::SocketAddr) -> Self {
        Self {
            env: vec![("KMSD_METRICS__LISTEN".into(), addr.to_string())],
            ..Self::default()
        }
    }
}

/// A local TCP address nothing listens on right now.
pub fn free_tcp_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET /metrics` over plain HTTP/1.0: the status code and the body.
///
/// # Errors
/// Nothing listens at `addr`, or the answer is not HTTP.
pub fn scrape(addr: std::net::SocketAddr) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((code, body.to_string()))
}

/// The value of the series `series` (name and labels, exactly as
/// rendered) in a scrape body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A running `kmsd` with its own folder.
#[derive(Debug)]
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub opts: DaemonOptions,
    child: Option<Child>,
}

/// Writes a fresh random root key with mode 0600.
pub fn write_root_key(path: &Path) {
    let mut key = [0u8; 32];
    getrandom(&mut key);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(&key).unwrap();
}

/// Gives `dir` and everything under it to `uid` (group `uid` too).
fn chown_tree(dir: &Path, uid: u32) {
    let id = Some(nix::unistd::Uid::from_raw(uid));
    let gid = Some(nix::unistd::Gid::from_raw(uid));
    nix::unistd::chown(dir, id, gid).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            chown_tree(&p, uid);
        } else {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &p,
                id,
                gid,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
    }
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").unwrap().read_exact(buf).unwrap();
}

impl TestDaemon {
    /// Starts a daemon with default options and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(DaemonOptions::default())
    }

    /// Starts a daemon with `opts` and waits until it answers.
    pub fn start_with(opts: DaemonOptions) -> Self {
        match Self::try_start_with(opts) {
            Ok(d) => d,
            Err(logs) => panic!("{logs}"),
        }
    }

    /// Like [`TestDaemon::start_with`], for a daemon that may refuse to
    /// start: `Err` holds why and its log.
    pub fn try_start_with(opts: DaemonOptions) -> Result<Self, String> {
        let mut d = Self::launch(opts);
        d.try_wait_ready()?;
        Ok(d)
    }

    /// Starts a daemon with `opts` without waiting for it to answer (see
    /// [`TestDaemon::wait_ready_within`]).
    pub fn launch(opts: DaemonOptions) -> Self {
        let dir = tempfile::Builder::new().prefix("kmsd-test-").tempdir().unwrap();
        let socket = opts.socket.clone().unwrap_or_else(|| dir.path().join("kmsd.sock"));
        let config = dir.path().join("kmsd.toml");
        let root_key = opts.root_key.clone().unwrap_or_else(|| {
            let path = dir.path().join("root-key");
            write_root_key(&path);
            path
        });
        let toml = format!(
            "zone = {zone:?}\nsocket = {socket:?}\nstate_dir = {state:?}\nroot_key = {root:?}\n\
             [access]\nadmins = [\"uid:0\"]\n[metrics]\nlisten = \"\"\n{extra}\n",
            zone = opts.zone,
            socket = socket,
            state = opts.state_dir.clone().unwrap_or_else(|| dir.path().join("state")),
            root = root_key,
            extra = opts.extra_config,
        );
        std::fs::write(&config, toml).unwrap();
        let log = dir.path().join("kmsd.log");
        if let Some(uid) = opts.run_as {
            std::fs::File::create(&log).unwrap();
            chown_tree(dir.path(), uid);
        }
        let mut d = Self {
            dir,
            socket,
            config,
            log,
            opts,
            child: None,
        };
        d.spawn();
        d
    }

    /// The daemon command as the tests run it (config, env, log file).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("kmsd"));
        cmd.arg("--config").arg(&self.config);
        cmd.env_remove("KMSD_SOCKET").env("RUST_LOG", "info");
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        if let Some(uid) = self.opts.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        if let Some(n) = self.opts.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: the closure runs in the child between fork and exec
            // and only calls setrlimit, which is async-signal-safe, with a
            // valid rlimit it owns a copy of.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    fn spawn(&mut self) {
        self.child = Some(self.command().spawn().expect("start kmsd"));
    }

    /// Waits until the socket answers a handshake (10 s at most).
    pub fn wait_ready(&mut self) {
        if let Err(why) = self.try_wait_ready() {
            panic!("{why}");
        }
    }

    fn try_wait_ready(&mut self) -> Result<(), String> {
        self.wait_ready_within(Duration::from_secs(30))
    }

    /// Waits until the socket answers a handshake; `Err` holds why not
    /// (exited, or not within `timeout`) and the log.
    pub fn wait_ready_within(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if BlockingClient::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                return Err(format!("kmsd exited with {status} during start-up:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "kmsd did not become ready within {timeout:?}:\n{}",
            self.logs()
        ))
    }

    /// The daemon's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// The pids of the daemon's mount processes (its children running
    /// `kmsd mount`), in no particular order.
    pub fn mount_pids(&self) -> Vec<Pid> {
        mount_children(self.pid())
    }

    /// A blocking client connected as this process, whose replies must
    /// come within [`CALL_DEADLINE`] (a read past it is an error).
    pub fn client(&self) -> BlockingClient {
        let client = BlockingClient::connect(&self.socket).expect("connect to kmsd");
        client.set_read_timeout(Some(CALL_DEADLINE)).expect("set read timeout");
        client
    }

    /// Runs `kmsctl --socket SOCKET ARGS...` with `stdin`.
    pub fn kmsctl(&self, args: &[&str], stdin: &[u8]) -> Output {
        kmsctl_at(&self.socket, args, stdin)
    }

    /// SIGKILL, then wait; also for its mount processes, which the kernel
    /// kills with it (`PR_SET_PDEATHSIG`) but which may still hold files
    /// for a moment after kmsd is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mounts = mount_children(Pid::from_raw(c.id() as i32));
            let _ = c.kill();
            let _ = c.wait();
            for pid in mounts {
                let _ = kill(pid, Signal::SIGKILL);
                let gone = || !Path::new(&format!("/proc/{pid}")).exists();
                let _ = wait_for(Duration::from_secs(10), || gone().then_some(()));
            }
        }
    }

    /// SIGTERM, then wait for the exit status (10 s at most).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "kmsd did not exit within 10 s of SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit by itself (`timeout` at most).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_for(timeout, || child.try_wait().unwrap())?;
        self.child = None;
        Some(status)
    }

    /// Starts the daemon again on the same folder.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
        self.wait_ready();
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        // A killed daemon leaves its FUSE mount behind; detach it so the
        // temporary folder can be removed.
        let mnt = self.dir.path().join("mnt");
        if is_mounted(&mnt) {
            let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// How long one `kmsctl` run or one client reply may take in a test before
/// the test fails (a daemon that accepts and never answers must not hang
/// the suite).
pub const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `kmsd ARGS...` to its end (restore, migrate), with a deadline of
/// [`CALL_DEADLINE`].
pub fn kmsd_offline(args: &[&std::ffi::OsStr]) -> Output {
    kmsd_offline_with(args, &[])
}

/// [`kmsd_offline`] with `env` added (e.g. a `KMSDTEST_FAULT`).
pub fn kmsd_offline_with(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(bin("kmsd"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("KMSD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kmsd");
    if wait_for(CALL_DEADLINE, || child.try_wait().unwrap()).is_none() {
        let _ = child.kill();
        panic!("kmsd {args:?} ran past {CALL_DEADLINE:?}");
    }
    child.wait_with_output().unwrap()
}

/// Runs `kmsctl --socket SOCKET ARGS...` with `stdin`; kills it and fails
/// the test if it runs past [`CALL_DEADLINE`].
pub fn kmsctl_at(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(bin("kmsctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("KMSD_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kmsctl");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_for(CALL_DEADLINE, || child.try_wait().unwrap());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("kmsctl {args:?} did not finish within {CALL_DEADLINE:?}");
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text of a command's stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of a command's stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether FUSE mounts can be tested here. Under `CI` a missing FUSE is a
/// failure, not a skip.
pub fn fuse_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
        && nix::unistd::geteuid().is_root();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "FUSE tests need /dev/fuse and root, and CI is set"
        );
        eprintln!("skipping: /dev/fuse is not usable or not root (set CI to make this a failure)");
    }
    ok
}

impl TestDaemon {
    /// Starts a daemon that mounts `DIR/mnt` over `DIR/data` with a key
    /// named `fs` (created on a first start, then mounted on a restart, as
    /// an operator would).
    pub fn start_with_mount() -> Self {
        Self::start_with_mount_opts(DaemonOptions::default())
    }

    /// [`start_with_mount`](Self::start_with_mount) with `opts`.
    pub fn start_with_mount_opts(opts: DaemonOptions) -> Self {
        Self::start_with_mount_names(opts, "encrypted")
    }

    /// [`start_with_mount_opts`](Self::start_with_mount_opts) whose mount
    /// has `names = NAMES` (`"encrypted"` or `"plain"`).
    pub fn start_with_mount_names(opts: DaemonOptions, names: &str) -> Self {
        let mut d = Self::start_with(opts);
        d.client()
            .create_key(kms_client::proto::CreateKey {
                name: Some("fs".into()),
                ..Default::default()
            })
            .expect("create fs key");
        assert!(d.terminate().success());
        let mount = format!(
            "\n[[mount]]\nsource = {:?}\ntarget = {:?}\nkey = \"fs\"\nnames = {names:?}\n",
            d.data(),
            d.dir.path().join("mnt")
        );
        let mut cfg = std::fs::read_to_string(&d.config).unwrap();
        cfg.push_str(&mount);
        std::fs::write(&d.config, cfg).unwrap();
        d.restart();
        d
    }

    /// The mountpoint of [`start_with_mount`](Self::start_with_mount).
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// The backing dir of [`start_with_mount`](Self::start_with_mount).
    pub fn data(&self) -> PathBuf {
        self.opts
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }
}

/// The children of `parent` that run `kmsd mount`.
pub fn mount_children(parent: Pid) -> Vec<Pid> {
    let want = parent.as_raw().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().to_string();
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let is_mount = args.nth(1) == Some(b"mount".as_slice());
            (ppid == want && is_mount).then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// Is `path` a mountpoint (listed in /proc/self/mounts)?
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*p))
}

/// Runs `kmsctl --socket SOCKET ARGS...` as `uid` (gid the same), after
/// opening the daemon's folder and socket to other users, as membership of
/// the socket's group would.
pub fn kmsctl_as(d: &TestDaemon, uid: u32, args: &[&str], stdin: &[u8]) -> Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut child = Command::new(bin("kmsctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .uid(uid)
        .gid(uid)
        .env_remove("KMSD_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kmsctl as another uid");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
