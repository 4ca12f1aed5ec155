//! Mount processes started by kmsd itself, outside systemd (`[[mount]]`
//! in kmsd.toml, the `--dev` mount, the e2e harness): one `kmsd mount`
//! child per filesystem, from one supervisor thread that restarts a child
//! that dies and stops them all when kmsd stops. ARCHITECTURE.md,
//! "Processes".
//!
//! Each child talks to kmsd over one end of a socket pair (its fd 3,
//! `--kmsd-fd 3`), whose other end kmsd serves with its own authority
//! (`server::Trusted`): the filesystems of `[[mount]]` keep using their key
//! as they did when kmsd served them in-process, whoever owns it. Under
//! systemd a mount process dials the socket like any caller instead.
//!
//! Each child gets `PR_SET_PDEATHSIG` SIGKILL, which fires when the thread
//! that forked it ends: that is why one long-lived thread forks them all.
//! A killed kmsd so leaves a stale mountpoint (cleared by the next start),
//! never a mount process serving on alone.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child may take to mount before kmsd gives up on it.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a child may take to unmount after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause before a child that died is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// How often the supervisor looks at its children.
const POLL: Duration = Duration::from_millis(100);

/// Where the supervisor hands kmsd's end of each child's connection.
/// kmsd's end of a child's channel, with the key the child may use.
pub type ToServe = tokio::sync::mpsc::UnboundedSender<(UnixStream, String)>;

/// The descriptor a child finds its kmsd connection on.
const KMSD_FD: i32 = 3;

/// One filesystem to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Names the admin socket (`mounts/NAME.sock`).
    pub name: String,
    pub source: PathBuf,
    pub target: PathBuf,
    pub key: String,
    /// kmsd's socket, which the child connects to.
    pub socket: PathBuf,
    /// Encrypted or plain names for a new backing directory.
    pub names: crate::mount::Names,
}

impl Spec {
    fn admin_socket(&self) -> PathBuf {
        crate::mount::admin_dir(&self.socket).join(format!("{}.sock", self.name))
    }

    /// The child's command, with `conn` as its fd 3.
    fn command(&self, conn: &UnixStream) -> std::io::Result<Command> {
        use std::os::fd::AsRawFd;
        let fd = conn.as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("mount")
            .arg(&self.name)
            .arg("--source")
            .arg(&self.source)
            .arg("--target")
            .arg(&self.target)
            .arg("--key")
            .arg(&self.key)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--names")
            .arg(self.names.as_str())
            .arg("--kmsd-fd")
            .arg(KMSD_FD.to_string())
            // Not ours: a child of kmsd is never socket-activated or
            // supervised by systemd itself.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC");
        // SAFETY: runs in the child between fork and exec and only calls
        // prctl, setpgid, dup2 and fcntl, which are async-signal-safe, on `fd`, which
        // the parent keeps open until the child has started.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own process group: a terminal's Ctrl-C reaches kmsd
                // only, which then stops its children in order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 leaves the copy without FD_CLOEXEC; onto itself it
                // does nothing, so clear the flag then.
                let ok = if fd == KMSD_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(fd, KMSD_FD) == KMSD_FD
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Why a child did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start the mount process {name} for {}", target.display())]
    Spawn {
        name: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the mount process {name} for {} exited with {status} before mounting (its log is above)", target.display())]
    Exited {
        name: String,
        target: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("the mount process {name} for {} did not mount within {}s", target.display(), START_TIMEOUT.as_secs())]
    Timeout { name: String, target: PathBuf },
}

/// A running child and its spec.
struct Running {
    spec: Spec,
    child: Option<Child>,
    /// When a dead child may be started again.
    restart_at: Option<Instant>,
    /// When the child was last started, and how many times in a row it
    /// died within [`STEADY`] of starting.
    started: Instant,
    quick_deaths: u32,
}

/// A child that lived this long was healthy: its next death is not counted
/// against it. Nor is a death by a signal.
const STEADY: Duration = Duration::from_secs(60);

/// Longest pause before a restart.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The pause before restarting a child that died quickly `quick_deaths`
/// times in a row: 1 s, doubling up to a minute, so that a child that
/// cannot run (a bad backing folder, a key it may not use) is not started
/// and logged every second forever.
fn restart_pause(quick_deaths: u32) -> Duration {
    RESTART_PAUSE.saturating_mul(1 << quick_deaths.min(10)).min(MAX_PAUSE)
}

/// Messages to the supervisor thread.
enum Order {
    /// Start this child, and say whether it mounted.
    Start(Spec, Sender<Result<(), ChildError>>),
    /// Stop every child and end.
    Stop,
}

/// The supervisor thread; stopping it stops every child.
#[derive(Debug)]
pub struct Children {
    orders: Sender<Order>,
    thread: Option<JoinHandle<()>>,
}

impl Children {
    /// Starts the supervisor thread (no child yet).
    ///
    /// # Errors
    /// The thread cannot be created.
    pub fn new(to_serve: ToServe) -> std::io::Result<Self> {
        let (orders, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mount-children".into())
            .spawn(move || supervise(&rx, &to_serve))?;
        Ok(Self {
            orders,
            thread: Some(thread),
        })
    }

    /// Starts a child for `spec` and waits until it has mounted (its admin
    /// socket answers), it exits, or [`START_TIMEOUT`] passes. A child
    /// that failed is not restarted.
    ///
    /// # Errors
    /// See [`ChildError`].
    pub fn start(&self, spec: Spec) -> Result<(), ChildError> {
        let (tx, rx) = mpsc::channel();
        let (name, target) = (spec.name.clone(), spec.target.clone());
        if self.orders.send(Order::Start(spec, tx)).is_err() {
            return Err(ChildError::Timeout { name, target });
        }
        rx.recv().unwrap_or(Err(ChildError::Timeout { name, target }))
    }

    /// Stops every child (each unmounts) and the supervisor.
    pub fn stop(&mut self) {
        let _ = self.orders.send(Order::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn supervise(orders: &Receiver<Order>, to_serve: &ToServe) {
    let mut running: Vec<Running> = Vec::new();
    loop {
        match orders.recv_timeout(POLL) {
            Ok(Order::Start(spec, reply)) => match start(&spec, to_serve) {
                Ok(child) => {
                    running.push(Running {
                        spec,
                        child: Some(child),
                        restart_at: None,
                        started: Instant::now(),
                        quick_deaths: 0,
                    });
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Ok(Order::Stop) | Err(RecvTimeoutError::Disconnected) => return stop_all(&mut running),
            Err(RecvTimeoutError::Timeout) => {}
        }
        for r in &mut running {
            look_after(r, to_serve);
        }
    }
}

/// Spawns a child for `spec` and waits until it mounted.
fn start(spec: &Spec, to_serve: &ToServe) -> Result<Child, ChildError> {
    let mut child = spawn(spec, to_serve)?;
    let admin = spec.admin_socket();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ChildError::Exited {
                name: spec.name.clone(),
                target: spec.target.clone(),
                status,
            });
        }
        if UnixStream::connect(&admin).is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            stop_child(&spec.name, &mut child);
            return Err(ChildError::Timeout {
                name: spec.name.clone(),
                target: spec.target.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns a child with a new connection, whose other end goes to the
/// server.
fn spawn(spec: &Spec, to_serve: &ToServe) -> Result<Child, ChildError> {
    let failed = |source| ChildError::Spawn {
        name: spec.name.clone(),
        target: spec.target.clone(),
        source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(failed)?;
    let child = spec.command(&theirs).and_then(|mut c| c.spawn()).map_err(failed)?;
    drop(theirs);
    if to_serve.send((ours, spec.key.clone())).is_err() {
        tracing::warn!(name = %spec.name, "kmsd is stopping; the mount process gets no connection");
    }
    tracing::info!(name = %spec.name, pid = child.id(), target = %spec.target.display(), "mount process started");
    Ok(child)
}

/// Restarts a child that died, after [`RESTART_PAUSE`].
fn look_after(r: &mut Running, to_serve: &ToServe) {
    if let Some(child) = &mut r.child {
        if let Ok(Some(status)) = child.try_wait() {
            // Killed by a signal (an operator's SIGKILL, a crash) restarts
            // after the base pause; a child that exits with an error soon
            // after starting (it cannot run: a bad folder, a key it may not
            // use) is started again ever more slowly.
            if r.started.elapsed() >= STEADY || status.code().is_none() {
                r.quick_deaths = 0;
            }
            let pause = restart_pause(r.quick_deaths);
            r.quick_deaths = r.quick_deaths.saturating_add(1);
            tracing::warn!(name = %r.spec.name, %status, ?pause, "mount process died; starting it again");
            r.child = None;
            r.restart_at = Some(Instant::now() + pause);
        }
        return;
    }
    if r.restart_at.is_some_and(|t| Instant::now() >= t) {
        match spawn(&r.spec, to_serve) {
            Ok(child) => {
                r.child = Some(child);
                r.restart_at = None;
                r.started = Instant::now();
            }
            Err(e) => {
                let pause = restart_pause(r.quick_deaths);
                r.quick_deaths = r.quick_deaths.saturating_add(1);
                tracing::warn!(error = %crate::keys::error::error_chain(&e), ?pause, "mount process not restarted; trying again");
                r.restart_at = Some(Instant::now() + pause);
            }
        }
    }
}

fn stop_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        if let Some(child) = &r.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }
    for r in running.iter_mut() {
        if let Some(mut child) = r.child.take() {
            stop_child(&r.spec.name, &mut child);
        }
    }
}

/// SIGTERM (again), then SIGKILL after [`STOP_TIMEOUT`]; reaps the child.
fn stop_child(name: &str, child: &mut Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(name, "mount process did not stop within 10 s; killed");
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_a_minute() {
        let pauses: Vec<u64> = (0..9).map(|n| restart_pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(restart_pause(u32::MAX), MAX_PAUSE);
    }
}
