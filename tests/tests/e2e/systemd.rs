//! systemd integration: the shipped units verify, and kmsd speaks the
//! `sd_notify` protocol in the right order.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kms_tests::{bin, stderr, DaemonOptions, TestDaemon};
use nix::sys::signal::{kill, Signal};

/// The `systemd/` folder of the source tree.
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The shipped `kmsd.service` with `ExecStart=` pointing at `kmsd`.
fn service_with_binary(kmsd: &Path) -> String {
    let unit = std::fs::read_to_string(units_dir().join("kmsd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/kmsd "), "{unit}");
    unit.replace(
        "ExecStart=/usr/local/bin/kmsd ",
        &format!("ExecStart={} ", kmsd.display()),
    )
}

/// The shipped `kmsd-mount@.service` with `ExecStart=` pointing at `kmsd`.
fn mount_service_with_binary(kmsd: &Path) -> String {
    let unit = std::fs::read_to_string(units_dir().join("kmsd-mount@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/kmsd mount "), "{unit}");
    unit.replace(
        "ExecStart=/usr/local/bin/kmsd mount ",
        &format!("ExecStart={} mount ", kmsd.display()),
    )
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kmsd.service"), service_with_binary(&bin("kmsd"))).unwrap();
    std::fs::copy(units_dir().join("kmsd.socket"), dir.path().join("kmsd.socket")).unwrap();
    std::fs::write(
        dir.path().join("kmsd-mount@.service"),
        mount_service_with_binary(&bin("kmsd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "kmsd.service",
            "kmsd.socket",
            "kmsd-mount@data.service",
        ])
        .current_dir(dir.path())
        // Our folder first, then the system's (trailing ':').
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    // Unknown keys and bad values are only warnings: any line naming our
    // files is a failure.
    let err = stderr(&out);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("kmsd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

/// What kmsd told a fake service manager, one datagram per entry.
pub(crate) struct NotifyListener {
    socket: UnixDatagram,
    pub(crate) path: PathBuf,
    pub(crate) got: Vec<String>,
}

impl NotifyListener {
    pub(crate) fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self {
            socket,
            path,
            got: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `want` (10 s at most); returns it.
    pub(crate) fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else { continue };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.got.push(msg.clone());
            if want(&msg) {
                return msg;
            }
        }
        panic!("no {what} within 10 s; got {:#?}", self.got);
    }

    /// Every datagram that arrives within `window` (each is also kept in
    /// `got`).
    pub(crate) fn during(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else { continue };
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.got.extend(out.iter().cloned());
        out
    }
}

pub(crate) fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn notify_socket_gets_ready_status_watchdog_reloading_stopping_in_order() {
    let notify_dir = tempfile::tempdir().unwrap();
    let mut n = NotifyListener::bind(notify_dir.path());
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), n.path.display().to_string()),
            // 0.2 s: kmsd pings every 0.1 s. No WATCHDOG_PID: meant for us.
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Default::default()
    });
    let ready = n.until("READY=1", |m| has(m, "READY=1"));
    assert_eq!(n.got.len(), 1, "READY=1 comes first: {:#?}", n.got);
    assert!(ready.contains("STATUS=1 keys, 0 mounts, 0 connections"), "{ready}");
    n.until("WATCHDOG=1", |m| has(m, "WATCHDOG=1"));
    n.until("a second WATCHDOG=1", |m| has(m, "WATCHDOG=1"));
    // The STATUS line follows the counts: a new key and an open connection.
    let mut c = d.client();
    c.create_key(kms_client::proto::CreateKey::default()).unwrap();
    n.until("STATUS with the new key and connection", |m| {
        m.contains("STATUS=2 keys, 0 mounts, 1 connections")
    });
    drop(c);
    kill(d.pid(), Signal::SIGHUP).unwrap();
    n.until("RELOADING=1", |m| has(m, "RELOADING=1"));
    let again = n.until("READY=1 after the reload", |m| has(m, "READY=1"));
    assert!(again.contains("STATUS=2 keys, 0 mounts"), "{again}");
    kill(d.pid(), Signal::SIGTERM).unwrap();
    n.until("STOPPING=1", |m| has(m, "STOPPING=1"));
    let status = d.wait_exit(Duration::from_secs(10)).expect("kmsd exits after SIGTERM");
    assert!(status.success(), "{status}");
}

/// The Debian mirror for the nspawn test: `KMS_TEST_DEBIAN_MIRROR`, else
/// debootstrap's own default.
fn debian_mirror() -> Option<String> {
    std::env::var("KMS_TEST_DEBIAN_MIRROR").ok()
}

/// Skips the test with `reason`, or fails it when `CI` is set.
fn skip(reason: &str) {
    assert!(std::env::var_os("CI").is_none(), "{reason}, and CI is set");
    eprintln!("skipping: {reason} (set CI to make this a failure)");
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A minimal Debian bookworm booted by `systemd-nspawn`, on a rootfs built
/// fresh in a temporary folder. Dropping it stops the container, detaches
/// anything still mounted under the rootfs and deletes it.
struct Container {
    root: Option<tempfile::TempDir>,
    nspawn: Option<std::process::Child>,
    /// The container's init, as a host pid.
    init: i32,
    log: PathBuf,
}

impl Container {
    /// `debootstrap` into a new folder; `None` when it failed (network).
    fn debootstrap() -> Option<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("kmsd-nspawn-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = dir.path().join("root");
        // A stuck mirror must not hang the suite: 10 minutes at most.
        let out = Command::new("timeout")
            .args([
                "600",
                "debootstrap",
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,fuse3",
                "bookworm",
            ])
            .arg(&root)
            .args(debian_mirror())
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("debootstrap failed:\n{}\n{}", kms_tests::stdout(&out), stderr(&out));
            detach_mounts_under(dir.path());
            return None;
        }
        Some(dir)
    }

    fn rootfs(&self) -> PathBuf {
        self.root.as_ref().unwrap().path().join("root")
    }

    /// Boots the rootfs and waits until systemd says it is up (60 s).
    fn boot(dir: tempfile::TempDir) -> Self {
        let log = dir.path().join("nspawn.log");
        let out = std::fs::File::create(&log).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "--register=no",
                "--keep-unit",
                "--bind=/dev/fuse",
                // nspawn's own system call filter refuses open_by_handle_at
                // to everything its systemd starts (it lets container roots
                // escape); a host's kmsd has it, and the mount needs it.
                "--capability=CAP_DAC_READ_SEARCH",
                "--system-call-filter=open_by_handle_at",
                "--boot",
                "--console=pipe",
                "-D",
            ])
            .arg(dir.path().join("root"))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("systemd-nspawn (Debian package systemd-container)");
        let mut c = Self {
            root: Some(dir),
            nspawn: Some(nspawn),
            init: 0,
            log,
        };
        let parent = c.nspawn.as_ref().unwrap().id();
        // The child of nspawn is systemd once it has exec'd; systemctl
        // answers "offline" until systemd listens, then waits for the boot.
        let mut state = String::new();
        let up = kms_tests::wait_for(Duration::from_secs(60), || {
            c.init = child_of(parent).filter(|&pid| comm(pid).as_deref() == Some("systemd"))?;
            state = kms_tests::stdout(&c.sh("systemctl is-system-running --wait"));
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        if up.is_none() {
            panic!("container did not boot (state {state:?}):\n{}", c.nspawn_log());
        }
        c
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `sh -c script` in every namespace of the container's init (not
    /// the service's), with a clean environment and a 60 s limit.
    fn sh(&self, script: &str) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["timeout", "60", "sh", "-c", script])
            .output()
            .unwrap()
    }

    /// Like [`sh`](Self::sh), and the script must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            let journal = kms_tests::stdout(&self.sh("journalctl -u kmsd -u 'kmsd-mount@*' --no-pager | tail -40"));
            panic!(
                "in the container: {script}\nexit {}\nstdout:\n{}\nstderr:\n{}\njournal of kmsd and its mounts:\n{journal}",
                out.status,
                kms_tests::stdout(&out),
                stderr(&out)
            );
        }
        kms_tests::stdout(&out)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut nspawn) = self.nspawn.take() {
            // SIGTERM: nspawn asks the container's systemd to power off.
            let pid = nix::unistd::Pid::from_raw(nspawn.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            if kms_tests::wait_for(Duration::from_secs(15), || nspawn.try_wait().ok().flatten()).is_none() {
                if self.init > 0 {
                    // Killing init ends every process of the container.
                    let _ = kill(nix::unistd::Pid::from_raw(self.init), Signal::SIGKILL);
                }
                let _ = nspawn.kill();
                let _ = nspawn.wait();
            }
        }
        if let Some(dir) = self.root.take() {
            if !detach_mounts_under(dir.path()) {
                // Never delete through a mount that is still there.
                eprintln!("leaving {} behind: still mounted", dir.keep().display());
            }
        }
    }
}

/// The first child of `parent` (its pid), from /proc.
fn child_of(parent: u32) -> Option<i32> {
    let want = parent.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
        (ppid == want).then_some(pid)
    })
}

/// The command name of `pid`.
fn comm(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim().to_string())
}

/// Lazily unmounts everything the host has mounted under `dir` (debootstrap
/// mounts /proc and /sys in the target); whether nothing is left.
fn detach_mounts_under(dir: &Path) -> bool {
    let prefix = dir.to_string_lossy().into_owned();
    let mounted = || -> Vec<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    };
    for m in mounted().iter().rev() {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    mounted().is_empty()
}

/// Copies the built binaries, the units, snippets and the example config
/// (metrics off) into the rootfs, as the README's install steps do, plus a
/// root key and the folders of one mount.
fn install(root: &Path) {
    let put = |from: &Path, to: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let to = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    put(&bin("kmsd"), "/usr/local/bin/kmsd", 0o755);
    put(&bin("kmsctl"), "/usr/local/bin/kmsctl", 0o755);
    let units = units_dir();
    put(&units.join("kmsd.service"), "/etc/systemd/system/kmsd.service", 0o644);
    put(&units.join("kmsd.socket"), "/etc/systemd/system/kmsd.socket", 0o644);
    put(
        &units.join("kmsd-mount@.service"),
        "/etc/systemd/system/kmsd-mount@.service",
        0o644,
    );
    // The example mount settings are the README's: /srv/app over
    // /var/lib/kmsd-data/app with the key app.
    put(&units.join("kmsd-mount.toml"), "/etc/kmsd/mounts/app.toml", 0o644);
    put(&units.join("kmsd.sysusers"), "/etc/sysusers.d/kmsd.conf", 0o644);
    put(&units.join("kmsd.tmpfiles"), "/etc/tmpfiles.d/kmsd.conf", 0o644);
    let example = std::fs::read_to_string(units.join("kmsd.toml")).unwrap();
    let config = example.replace("listen = \"127.0.0.1:9464\"", "listen = \"\"");
    assert_ne!(config, example, "metrics.listen in the example config");
    // The README's Kubernetes plugin socket, with the example's path.
    let plugin = "# socket = \"/run/kmsd/kubernetes/kms-v2.sock\"\n# key = \"cluster\"\n";
    assert!(config.contains(plugin), "[kubernetes] in the example config");
    let config = config.replace(plugin, &plugin.replace("# ", ""));
    std::fs::create_dir_all(root.join("etc/kmsd")).unwrap();
    std::fs::write(root.join("etc/kmsd/kmsd.toml"), config).unwrap();
    kms_tests::write_root_key(&root.join("etc/kmsd/root-key"));
    std::fs::create_dir_all(root.join("srv/app")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/kmsd-data/app")).unwrap();
}

const MOUNT: &str = "\n[[mount]]\nsource = \"/var/lib/kmsd-data/app\"\ntarget = \"/srv/app\"\nkey = \"app\"\n";

/// The mount unit of the scenario.
const MOUNT_UNIT: &str = "kmsd-mount@app";

/// Highest `systemd-analyze security` exposure allowed for kmsd.service.
const KMSD_EXPOSURE_MAX: f64 = 1.5;

/// The whole README installation under a real systemd: socket activation,
/// kmsd as user kmsd with no capability, a kmsd-mount@ instance in the
/// host's mount namespace, the two failing apart (kmsd restarted under an
/// open file, the mount process SIGKILLed), the exposure figures, reload,
/// stop without a mount left behind, the journal; then the README's
/// backup and restore as root, and kmsd (user kmsd) serving the result.
#[test]
fn under_real_systemd() {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        return skip("the nspawn test needs root");
    }
    if !have("debootstrap") || !have("systemd-nspawn") {
        return skip("the nspawn test needs the Debian packages debootstrap and systemd-container");
    }
    if !kms_tests::fuse_available() {
        return;
    }
    let Some(dir) = Container::debootstrap() else {
        return skip("debootstrap failed (no network to the Debian mirror?)");
    };
    let bootstrapped = started.elapsed();
    install(&dir.path().join("root"));
    let c = Container::boot(dir);
    let booted = started.elapsed();
    scenario(&c);
    eprintln!(
        "nspawn test: debootstrap {:.0?}, boot {:.0?}, scenario {:.0?}",
        bootstrapped,
        booted - bootstrapped,
        started.elapsed() - booted
    );
}

/// `systemctl show -P MainPID UNIT`.
fn main_pid(c: &Container, unit: &str) -> String {
    let pid = c.ok(&format!("systemctl show -P MainPID {unit}")).trim().to_string();
    assert_ne!(pid, "0", "{unit} has no main process");
    pid
}

/// The exposure `systemd-analyze security UNIT` gives, and its report.
fn exposure(c: &Container, unit: &str) -> (f64, String) {
    let report = c.ok(&format!("systemd-analyze security --no-pager {unit}"));
    let figure = report
        .lines()
        .find_map(|l| l.split("exposure level for ").nth(1))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    (figure, report)
}

fn scenario(c: &Container) {
    c.ok("systemd-sysusers && systemd-tmpfiles --create kmsd.conf");
    c.ok("systemctl enable --now kmsd.socket");
    assert_eq!(c.ok("stat -c '%U:%G %a' /run/kmsd/kmsd.sock").trim(), "root:kmsd 660");
    assert_eq!(
        c.sh("systemctl is-active kmsd.service").status.code(),
        Some(3),
        "not started yet"
    );
    // The first client starts kmsd through the socket. The mount's key is
    // root's: the mount process (root) uses it.
    c.ok("kmsctl key create --name app >/dev/null");
    assert_eq!(c.ok("systemctl is-active kmsd.service").trim(), "active");
    // The sandboxed kmsd can create the Kubernetes plugin socket, in its
    // RuntimeDirectory, with the configured mode.
    assert_eq!(
        c.ok("stat -c '%U:%G %a' /run/kmsd/kubernetes/kms-v2.sock").trim(),
        "kmsd:kmsd 600"
    );
    let status = wait_status(c, "2 keys, 0 mounts");
    assert!(
        status
            .lines()
            .any(|l| l.contains("TriggeredBy:") && l.contains("kmsd.socket")),
        "{status}"
    );
    // kmsd: its own user, no capability at all, its own mount namespace.
    let kmsd = main_pid(c, "kmsd");
    assert_eq!(c.ok(&format!("stat -c %U /proc/{kmsd}")).trim(), "kmsd");
    let caps = c.ok(&format!("grep -E '^Cap(Eff|Prm|Bnd)' /proc/{kmsd}/status"));
    assert_eq!(caps.matches("0000000000000000").count(), 3, "{caps}");
    c.ok(&format!(
        "test \"$(readlink /proc/1/ns/mnt)\" != \"$(readlink /proc/{kmsd}/ns/mnt)\""
    ));
    assert_eq!(c.ok("stat -c '%U %a' /var/lib/kmsd").trim(), "kmsd 700");

    // The mount: its own unit, in the host's mount namespace, with only the
    // capabilities the unit names (CHOWN DAC_OVERRIDE DAC_READ_SEARCH
    // FOWNER FSETID MKNOD SYS_ADMIN).
    c.ok(&format!("systemctl enable --now {MOUNT_UNIT}"));
    assert_eq!(c.ok(&format!("systemctl is-active {MOUNT_UNIT}")).trim(), "active");
    wait_status(c, "2 keys, 1 mounts");
    let mounter = main_pid(c, MOUNT_UNIT);
    c.ok(&format!(
        "test \"$(readlink /proc/1/ns/mnt)\" = \"$(readlink /proc/{mounter}/ns/mnt)\""
    ));
    let caps = c.ok(&format!("grep CapBnd /proc/{mounter}/status"));
    assert!(caps.contains("000000000820001f"), "{caps}");
    // kmsd holds no FUSE device; the mount process does.
    let fuse_fds = |pid: &str| c.ok(&format!("ls -l /proc/{pid}/fd | grep -c /dev/fuse || true"));
    assert_eq!(fuse_fds(&kmsd).trim(), "0");
    assert_ne!(fuse_fds(&mounter).trim(), "0");
    // A file through the mount, from a shell outside both services.
    c.ok("echo 'hello through systemd' > /srv/app/hello.txt");
    assert_eq!(c.ok("cat /srv/app/hello.txt"), "hello through systemd\n");
    let stored = std::fs::read(crate::only_encrypted_file(&c.rootfs().join("var/lib/kmsd-data/app"))).unwrap();
    assert!(!stored.windows(5).any(|w| w == b"hello"), "stored encrypted");
    // kmsd relays fs versions to the mount process's admin socket.
    let versions = c.ok("kmsctl fs versions /srv/app");
    assert!(versions.contains("1 (active)"), "{versions}");
    // Another user's private folder: the mount process walks and writes it
    // with DAC_OVERRIDE/DAC_READ_SEARCH and hands the new file over with
    // CHOWN.
    c.ok("install -d -o 65534 -g 65534 -m 0700 /srv/app/nobody");
    c.ok("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo mine > /srv/app/nobody/f'");
    // (Names are encrypted in the backing directory: found by owner.)
    let owner = c.ok("find /var/lib/kmsd-data/app -mindepth 1 -uid 65534 -printf '%U:%G %m %y\\n' | sort");
    assert_eq!(owner, "65534:65534 644 f\n65534:65534 700 d\n");
    each_capability_is_needed(c);
    // systemd hears the watchdog pings.
    let pinged = c.ok("systemctl show -P WatchdogTimestampMonotonic kmsd");
    assert_ne!(pinged.trim(), "0", "no WATCHDOG=1 seen by systemd");
    c.ok("echo secret | kmsctl encrypt app > /root/blob");
    let keys = c.ok("kmsctl --json key list");
    c.ok("echo 'opened after the restart' > /srv/app/later.txt");

    // kmsd restarted under an open file: the file keeps reading, the mount
    // process stays, a new open works once kmsd is back.
    let mounter = main_pid(c, MOUNT_UNIT);
    c.ok(
        "setsid sh -c 'exec 3</srv/app/hello.txt; while [ ! -e /root/go ]; do sleep 0.1; done; \
          cat <&3 > /root/read-after-restart' </dev/null >/dev/null 2>&1 &",
    );
    // A kube-apiserver pod bind-mounts /run/kmsd/kubernetes: the folder
    // itself must survive kmsd's restart, not be made anew.
    let folder = c.ok("stat -c %i /run/kmsd/kubernetes");
    c.ok("systemctl restart kmsd");
    wait_status(c, "2 keys, 1 mounts");
    assert_ne!(main_pid(c, "kmsd"), kmsd, "kmsd restarted");
    assert_eq!(
        c.ok("stat -c %i /run/kmsd/kubernetes"),
        folder,
        "the plugin socket's folder was made anew"
    );
    assert_eq!(c.ok("stat -c %F /run/kmsd/kubernetes/kms-v2.sock").trim(), "socket");
    assert!(
        c.sh("test -s /run/kmsd/changes/generation").status.success(),
        "no change file"
    );
    assert_eq!(main_pid(c, MOUNT_UNIT), mounter, "the mount process is not");
    c.ok("touch /root/go");
    let read = kms_tests::wait_for(Duration::from_secs(10), || {
        let got = c.ok("cat /root/read-after-restart 2>/dev/null || true");
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(
        read.as_deref(),
        Some("hello through systemd\n"),
        "the open file across the restart"
    );
    assert_eq!(c.ok("cat /srv/app/later.txt"), "opened after the restart\n");
    assert_eq!(c.ok("kmsctl --json key list"), keys);
    assert_eq!(c.ok("kmsctl decrypt < /root/blob"), "secret\n");

    // The mount process SIGKILLed: kmsd goes on, systemd brings the mount
    // back (clearing the stale mountpoint), nothing is lost.
    let kmsd = main_pid(c, "kmsd");
    c.ok(&format!("systemctl kill --kill-who=main -s SIGKILL {MOUNT_UNIT}"));
    let back = kms_tests::wait_for(Duration::from_secs(20), || {
        let active = c.sh(&format!("systemctl is-active {MOUNT_UNIT}")).status.success();
        let pid = c
            .ok(&format!("systemctl show -P MainPID {MOUNT_UNIT}"))
            .trim()
            .to_string();
        (active && pid != "0" && pid != mounter && c.sh("cat /srv/app/hello.txt").status.success()).then_some(())
    });
    assert!(
        back.is_some(),
        "the mount did not come back:\n{}",
        c.ok(&format!("journalctl -u {MOUNT_UNIT} --no-pager | tail -30"))
    );
    assert_eq!(main_pid(c, "kmsd"), kmsd, "kmsd is unaffected");
    assert_eq!(c.ok("cat /srv/app/hello.txt"), "hello through systemd\n");
    assert_eq!(c.ok("cat /srv/app/later.txt"), "opened after the restart\n");
    let theirs = "setpriv --reuid=65534 --regid=65534 --clear-groups cat /srv/app/nobody/f";
    assert_eq!(c.ok(theirs), "mine\n");
    assert_eq!(c.ok("kmsctl decrypt < /root/blob"), "secret\n");

    // Unmounted from outside: the mount process exits rather than serve
    // nothing, and systemd mounts it again.
    let before = c
        .ok(&format!("systemctl show -P MainPID {MOUNT_UNIT}"))
        .trim()
        .to_string();
    c.ok("umount -l /srv/app");
    let back = kms_tests::wait_for(Duration::from_secs(20), || {
        let pid = c
            .ok(&format!("systemctl show -P MainPID {MOUNT_UNIT}"))
            .trim()
            .to_string();
        (pid != "0" && pid != before && c.sh("cat /srv/app/hello.txt").status.success()).then_some(())
    });
    assert!(
        back.is_some(),
        "the mount did not come back after an outside umount:\n{}",
        c.ok(&format!("journalctl -u {MOUNT_UNIT} --no-pager | tail -30"))
    );
    assert_eq!(c.ok("cat /srv/app/hello.txt"), "hello through systemd\n");

    // The exposure figures.
    let (figure, report) = exposure(c, "kmsd.service");
    assert!(figure <= KMSD_EXPOSURE_MAX, "kmsd.service exposure {figure}:\n{report}");
    let (mount_figure, _) = exposure(c, &format!("{MOUNT_UNIT}.service"));
    eprintln!("systemd-analyze security: kmsd.service {figure}, {MOUNT_UNIT}.service {mount_figure}");

    c.ok("systemctl reload kmsd");
    // [[mount]] in kmsd.toml is refused under the unprivileged unit, naming
    // kmsd-mount@.
    c.ok("cp /etc/kmsd/kmsd.toml /root/kmsd.toml");
    c.ok(&format!(
        "printf '{}' >> /etc/kmsd/kmsd.toml",
        MOUNT.replace('\n', "\\n")
    ));
    assert!(
        !c.sh("systemctl restart kmsd").status.success(),
        "kmsd started with [[mount]]"
    );
    c.ok("cp /root/kmsd.toml /etc/kmsd/kmsd.toml");
    c.ok("systemctl reset-failed kmsd; systemctl restart kmsd");
    wait_status(c, "2 keys, 1 mounts");

    // Stop: the mount is gone, the folder is empty again.
    c.ok(&format!("systemctl stop {MOUNT_UNIT}"));
    let mounts = c.ok("cat /proc/self/mounts");
    assert!(!mounts.contains("/srv/app"), "{mounts}");
    assert_eq!(c.ok("ls -A /srv/app"), "");
    c.ok("systemctl stop kmsd");
    let journal = c.ok("journalctl -u kmsd --no-pager");
    for line in [
        "kmsd ready",
        "configuration reloaded",
        "SIGTERM: draining",
        "kmsd stopped",
        "kmsd::audit",
        "\"outcome\":\"ok\"",
        "kmsd-mount@NAME",
    ] {
        assert!(journal.contains(line), "no {line:?} in the journal:\n{journal}");
    }
    let journal = c.ok(&format!("journalctl -u {MOUNT_UNIT} --no-pager"));
    for line in ["mount process ready", "detached stale FUSE mount", "unmounted"] {
        assert!(journal.contains(line), "no {line:?} in the mount's journal:\n{journal}");
    }
    // The audit file the journal lines mirror verifies.
    let verified = c.ok("kmsctl audit verify --file /var/lib/kmsd/audit.log");
    assert!(verified.starts_with("ok:"), "{verified}");

    // A backup, as the README takes it (root made a global admin), then
    // the state folder lost: the README's restore, as root with the root
    // key file the credential is loaded from; systemd hands the folder
    // restore made to the user kmsd when the service starts.
    c.ok(
        "sed -i 's/^admins = \\[\\]/admins = [\"uid:0\"]/' /etc/kmsd/kmsd.toml && grep -q 'uid:0' /etc/kmsd/kmsd.toml",
    );
    c.ok("install -m 600 /dev/null /root/kmsd-backup.key && head -c 32 /dev/urandom > /root/kmsd-backup.key");
    c.ok("kmsctl backup --out /root/zone.kmsbak --backup-key /root/kmsd-backup.key");
    let keys = c.ok("kmsctl --json key list");
    c.ok("systemctl stop kmsd.socket kmsd.service");
    c.ok("mv /var/lib/kmsd /root/kmsd-state-lost");
    c.ok(
        "KMSD_ROOT_KEY=/etc/kmsd/root-key kmsd --config /etc/kmsd/kmsd.toml restore \
         --from /root/zone.kmsbak --backup-key /root/kmsd-backup.key",
    );
    c.ok("systemctl start kmsd.socket");
    assert_eq!(
        c.ok("kmsctl decrypt < /root/blob"),
        "secret\n",
        "restored under systemd"
    );
    assert_eq!(c.ok("kmsctl --json key list"), keys);
    assert_eq!(
        c.ok("stat -c '%U %a' /var/lib/kmsd /var/lib/kmsd/store.meta").trim(),
        "kmsd 700\nkmsd 600"
    );
    c.ok("systemctl stop kmsd.socket kmsd.service");
}

/// Lines of the mount process's journal saying it pins a descriptor per
/// inode.
fn unbounded_lines(c: &Container) -> usize {
    c.ok(&format!("journalctl -u {MOUNT_UNIT} --no-pager"))
        .matches("(unbounded)")
        .count()
}

/// What each capability of the mount unit beyond CAP_SYS_ADMIN is kept
/// for, tried through the mount; `tag` keeps the names of different rounds apart. True when it
/// works.
fn capability_use_works(c: &Container, cap: &str, tag: &str, unbounded_before: usize) -> bool {
    match cap {
        "CAP_DAC_READ_SEARCH" => {
            // Inodes reopened by file handle; without it the mount process
            // says, as it mounts, that every inode pins a descriptor.
            let quiet = kms_tests::wait_for(Duration::from_secs(5), || {
                (unbounded_lines(c) > unbounded_before).then_some(())
            });
            quiet.is_none()
        }
        "CAP_MKNOD" => {
            // Root's mknod of device nodes through the mount, as on ext4
            // (the mount is nodev: the nodes are inert there).
            let (chr, blk) = (format!("/srv/app/null-{tag}"), format!("/srv/app/loop-{tag}"));
            c.sh(&format!("mknod {chr} c 1 3 && mknod {blk} b 7 200"))
                .status
                .success()
                && c.ok(&format!("stat -c '%F %t:%T' {chr} {blk}"))
                    == "character special file 1:3\nblock special file 7:c8\n"
        }
        "CAP_FSETID" => {
            let f = format!("/srv/app/setgid-{tag}");
            c.ok(&format!("touch {f} && chown 65534:65534 {f} && chmod 2755 {f}"));
            c.ok(&format!("stat -c %a {f}")).trim() == "2755"
        }
        _ => {
            let dir = format!("/srv/app/user-{tag}");
            c.sh(&format!(
                "install -d -o 65534 -g 65534 -m 0700 {dir} && \
                 setpriv --reuid=65534 --regid=65534 --clear-groups sh -c 'echo x > {dir}/f'"
            ))
            .status
            .success()
        }
    }
}

/// Each of the unit's capabilities besides CAP_SYS_ADMIN is used: with the
/// unit as shipped every use works, and without any one of them its use
/// stops working.
fn each_capability_is_needed(c: &Container) {
    const KEPT: [&str; 7] = [
        "CAP_SYS_ADMIN",
        "CAP_CHOWN",
        "CAP_FOWNER",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FSETID",
        "CAP_MKNOD",
    ];
    let baseline = unbounded_lines(c);
    assert_eq!(
        baseline,
        0,
        "the unit as shipped leaves the mount's descriptors unbounded:\n{}",
        c.ok(&format!(
            "journalctl -u {MOUNT_UNIT} --no-pager | grep -F '(unbounded)' || true"
        ))
    );
    for cap in &KEPT[1..] {
        assert!(
            capability_use_works(c, cap, &format!("with-{cap}"), baseline),
            "{cap}'s use fails with the unit as shipped"
        );
    }
    let dropins = c.rootfs().join(format!("etc/systemd/system/{MOUNT_UNIT}.service.d"));
    std::fs::create_dir_all(&dropins).unwrap();
    for cap in &KEPT[1..] {
        let rest: Vec<&str> = KEPT.iter().copied().filter(|k| k != cap).collect();
        let conf = format!(
            "[Service]\nCapabilityBoundingSet=\nCapabilityBoundingSet={}\n",
            rest.join(" ")
        );
        std::fs::write(dropins.join("caps.conf"), conf).unwrap();
        let before = unbounded_lines(c);
        c.ok(&format!("systemctl daemon-reload && systemctl restart {MOUNT_UNIT}"));
        assert!(
            !capability_use_works(c, cap, &format!("without-{cap}"), before),
            "{cap}'s use worked without {cap}"
        );
    }
    std::fs::remove_file(dropins.join("caps.conf")).unwrap();
    c.ok(&format!("systemctl daemon-reload && systemctl restart {MOUNT_UNIT}"));
}

/// `systemctl status kmsd` once its Status: line contains `want` (10 s).
fn wait_status(c: &Container, want: &str) -> String {
    let mut last = String::new();
    let found = kms_tests::wait_for(Duration::from_secs(10), || {
        last = kms_tests::stdout(&c.sh("systemctl status kmsd --no-pager"));
        last.lines()
            .any(|l| l.trim_start().starts_with("Status: ") && l.contains(want))
            .then(|| last.clone())
    });
    found.unwrap_or_else(|| panic!("no Status: line with {want:?}:\n{last}"))
}
