//! systemd integration: readiness and status notifications (`sd_notify`),
//! the watchdog interval, and sockets passed by socket activation
//! (`LISTEN_FDS`). Everything is a no-op outside systemd.

use std::os::fd::FromRawFd;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=...`
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic timestamp systemd asks for).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1`
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send `WATCHDOG=1`: half the configured timeout.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// The first socket passed by systemd socket activation, if any.
///
/// # Errors
/// A message when `LISTEN_FDS` is set for this process but invalid.
pub fn listen_fd() -> Result<Option<std::os::unix::net::UnixListener>, String> {
    let mut fds = sd_notify::listen_fds().map_err(|e| e.to_string())?;
    let Some(fd) = fds.next() else { return Ok(None) };
    if fds.len() > 0 {
        tracing::warn!(extra = fds.len(), "more than one socket passed; using the first");
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID
    // matched) for us to own; nothing else in the process uses it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    Ok(Some(listener))
}
