//! Named fault points for the end-to-end crash tests, compiled in only
//! with the `test-faults` feature (a build without it has none: [`point`]
//! is an empty inline function and the environment is never read).
//!
//! With the feature, `KMSDTEST_FAULT_POINTS=FILE` arms the points listed in
//! `FILE`, one `ACTION:POINT` a line. The first time the process passes an
//! armed point, that line is removed from the file (so a restarted mount
//! process does not fail again) and the action runs:
//!
//! - `kill:POINT`: SIGKILL the whole process, as a crash would;
//! - `fail:POINT`: the step fails with `EIO`, as a full or failing disk would;
//! - `pause:POINT`: sleep 2 s, to widen a race window;
//! - `tear:POINT` (only at [`tear`] points): write the first half of what
//!   the step writes, then SIGKILL, as a kill cutting a `pwrite` would.
//!
//! The point names are the steps of FORMAT.md's crash order, e.g.
//! `mkdir.after-entry` (the directory exists, its id is not written yet).

/// Passes the fault point `name`.
///
/// # Errors
/// `EIO` when the point is armed with `fail`.
#[cfg(not(feature = "test-faults"))]
#[inline(always)]
pub fn point(_name: &str) -> nix::Result<()> {
    Ok(())
}

/// Passes the fault point `name`.
///
/// # Errors
/// `EIO` when the point is armed with `fail`.
#[cfg(feature = "test-faults")]
pub fn point(name: &str) -> nix::Result<()> {
    match armed::take(name) {
        None => Ok(()),
        Some(armed::Action::Kill) => {
            tracing::warn!(point = name, "test fault point: the mount process kills itself");
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            // SIGKILL is not delivered synchronously everywhere: never go on.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Some(armed::Action::Fail) => {
            tracing::warn!(point = name, "test fault point: the step fails with EIO");
            Err(nix::Error::EIO)
        }
        Some(armed::Action::Pause) => {
            tracing::warn!(point = name, "test fault point: pausing 2 s");
            std::thread::sleep(std::time::Duration::from_secs(2));
            Ok(())
        }
        // Only `tear` points tear.
        Some(armed::Action::Tear) => Ok(()),
    }
}

/// A write-in-place point: with `tear:NAME` armed, `put(half)` writes the
/// first half of the step's bytes and the process kills itself.
#[cfg(not(feature = "test-faults"))]
#[inline(always)]
pub fn tear(_name: &str, _len: usize, _put: impl FnOnce(usize)) {}

/// A write-in-place point: with `tear:NAME` armed, `put(half)` writes the
/// first half of the step's bytes and the process kills itself.
#[cfg(feature = "test-faults")]
pub fn tear(name: &str, len: usize, put: impl FnOnce(usize)) {
    if let Some(armed::Action::Tear) = armed::take(name) {
        tracing::warn!(
            point = name,
            "test fault point: the write is cut in the middle and the mount process kills itself"
        );
        put(len / 2);
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

#[cfg(feature = "test-faults")]
mod armed {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    pub enum Action {
        Kill,
        Fail,
        Pause,
        Tear,
    }

    /// The armed points' file, from the environment once.
    fn file() -> Option<&'static PathBuf> {
        static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
        FILE.get_or_init(|| std::env::var_os("KMSDTEST_FAULT_POINTS").map(PathBuf::from))
            .as_ref()
    }

    /// The action armed at `name`, disarming it.
    pub fn take(name: &str) -> Option<Action> {
        static LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
        let path = file()?;
        let _held = LOCK.lock();
        let text = std::fs::read_to_string(path).ok()?;
        let mut found = None;
        let mut rest = String::new();
        for line in text.lines() {
            let action = match line.split_once(':') {
                Some(("kill", p)) if p == name => Some(Action::Kill),
                Some(("fail", p)) if p == name => Some(Action::Fail),
                Some(("pause", p)) if p == name => Some(Action::Pause),
                Some(("tear", p)) if p == name => Some(Action::Tear),
                _ => None,
            };
            match action {
                Some(a) if found.is_none() => found = Some(a),
                _ => {
                    rest.push_str(line);
                    rest.push('\n');
                }
            }
        }
        found.as_ref()?;
        // Written in place: the test that armed it reads it only after
        // the point fired.
        std::fs::write(path, rest).ok()?;
        found
    }
}
