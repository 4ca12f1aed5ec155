//! Keeping key material out of core dumps and swap, at start.
//!
//! - `PR_SET_DUMPABLE` 0: no core dump, and no `ptrace` attach or
//!   `/proc/PID/mem` read by processes of the same uid;
//! - `RLIMIT_CORE` 0 (soft and hard), in case something sets the process
//!   dumpable again (an `execve` of a set-id binary would);
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` when the memory-lock
//!   limit allows it (`RLIMIT_MEMLOCK` unlimited, as the unit sets, or
//!   `CAP_IPC_LOCK` in the effective set), so no page
//!   holding key material is ever written to swap. `MCL_ONFAULT` locks pages
//!   as they are touched, so thread stacks and malloc arenas that are only
//!   reserved do not become resident. With a finite limit (a
//!   user's `kmsd --dev`) locking everything would make allocations fail
//!   past the limit, so memory is left unlocked and the log says so.
//!
//! The results are returned for the log line, never fatal: a sandbox may
//! forbid one of these without making the daemon unsafe to run.

use nix::sys::mman::{mlockall, MlockAllFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// What [`process`] managed to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    pub non_dumpable: bool,
    pub core_limit_zero: bool,
    /// `Ok` when memory is locked, else why not.
    pub memory_locked: Result<(), String>,
}

/// Applies the measures above to the whole process; call before any key
/// is loaded and before threads are started.
pub fn process() -> Hardening {
    let non_dumpable = nix::sys::prctl::set_dumpable(false).is_ok();
    let core_limit_zero = setrlimit(Resource::RLIMIT_CORE, 0, 0).is_ok();
    Hardening {
        non_dumpable,
        core_limit_zero,
        memory_locked: lock_memory(),
    }
}

fn lock_memory() -> Result<(), String> {
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| e.to_string())?;
    if soft != RLIM_INFINITY && !has_ipc_lock() {
        return Err(format!(
            "RLIMIT_MEMLOCK is {soft} bytes; run with LimitMEMLOCK=infinity to keep keys out of swap"
        ));
    }
    let on_fault = MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE | on_fault).map_err(|e| format!("mlockall: {e}"))
}

/// Whether `CAP_IPC_LOCK` (bit 14) is in our effective capabilities, as
/// `/proc/self/status` shows them.
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Logs what [`process`] did.
pub fn log(h: &Hardening) {
    match &h.memory_locked {
        Ok(()) => tracing::info!(
            non_dumpable = h.non_dumpable,
            core_limit_zero = h.core_limit_zero,
            "memory locked: key material never reaches swap; core dumps off"
        ),
        Err(why) => tracing::warn!(
            non_dumpable = h.non_dumpable,
            core_limit_zero = h.core_limit_zero,
            "memory not locked (key material could reach swap): {why}"
        ),
    }
}
