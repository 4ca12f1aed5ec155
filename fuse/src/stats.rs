//! Counters of one mounted filesystem, for the daemon's metrics. Plain
//! atomics: this crate does not know about any exporter; the daemon reads
//! a [`FsStatsSnapshot`] now and then.

use std::sync::atomic::{AtomicU64, Ordering};

/// The filesystem operations counted, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOp {
    Lookup,
    Getattr,
    Create,
    Open,
    Read,
    Write,
    Fsync,
    Mkdir,
    Unlink,
    Rmdir,
    Rename,
    Readdir,
}

impl FsOp {
    pub const ALL: [FsOp; 12] = [
        FsOp::Lookup,
        FsOp::Getattr,
        FsOp::Create,
        FsOp::Open,
        FsOp::Read,
        FsOp::Write,
        FsOp::Fsync,
        FsOp::Mkdir,
        FsOp::Unlink,
        FsOp::Rmdir,
        FsOp::Rename,
        FsOp::Readdir,
    ];

    /// Stable lower-case name, as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FsOp::Lookup => "lookup",
            FsOp::Getattr => "getattr",
            FsOp::Create => "create",
            FsOp::Open => "open",
            FsOp::Read => "read",
            FsOp::Write => "write",
            FsOp::Fsync => "fsync",
            FsOp::Mkdir => "mkdir",
            FsOp::Unlink => "unlink",
            FsOp::Rmdir => "rmdir",
            FsOp::Rename => "rename",
            FsOp::Readdir => "readdir",
        }
    }
}

/// Live counters of one filesystem.
#[derive(Debug, Default)]
pub struct FsStats {
    ops: [AtomicU64; FsOp::ALL.len()],
    dek_cache_hits: AtomicU64,
    dek_cache_misses: AtomicU64,
    tamper_detections: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsStatsSnapshot {
    /// Every [`FsOp`] with its count, in `FsOp::ALL` order.
    pub ops: Vec<(&'static str, u64)>,
    /// Opens that found the file's DEK already unwrapped.
    pub dek_cache_hits: u64,
    /// Opens that had to unwrap the DEK (first open of a file).
    pub dek_cache_misses: u64,
    /// Reads or opens refused because a file was tampered with.
    pub tamper_detections: u64,
    /// Plaintext bytes served to readers.
    pub bytes_read: u64,
    /// Plaintext bytes accepted from writers.
    pub bytes_written: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl FsStats {
    pub fn op(&self, op: FsOp) {
        let i = FsOp::ALL.iter().position(|o| *o == op).unwrap_or(0);
        add(&self.ops[i], 1);
    }

    pub fn dek_cache(&self, hit: bool) {
        add(
            if hit {
                &self.dek_cache_hits
            } else {
                &self.dek_cache_misses
            },
            1,
        );
    }

    pub fn tamper_detected(&self) {
        add(&self.tamper_detections, 1);
    }

    pub fn read(&self, bytes: usize) {
        add(&self.bytes_read, bytes as u64);
    }

    pub fn written(&self, bytes: usize) {
        add(&self.bytes_written, bytes as u64);
    }

    /// The counters now.
    pub fn snapshot(&self) -> FsStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FsStatsSnapshot {
            ops: FsOp::ALL
                .iter()
                .zip(&self.ops)
                .map(|(o, c)| (o.as_str(), get(c)))
                .collect(),
            dek_cache_hits: get(&self.dek_cache_hits),
            dek_cache_misses: get(&self.dek_cache_misses),
            tamper_detections: get(&self.tamper_detections),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_every_op_in_order_with_its_count() {
        let s = FsStats::default();
        s.op(FsOp::Read);
        s.op(FsOp::Read);
        s.op(FsOp::Readdir);
        s.dek_cache(false);
        s.dek_cache(true);
        s.dek_cache(true);
        s.read(10);
        s.written(7);
        s.tamper_detected();
        let snap = s.snapshot();
        assert_eq!(snap.ops.len(), FsOp::ALL.len());
        assert!(snap.ops.contains(&("read", 2)) && snap.ops.contains(&("readdir", 1)));
        assert!(snap.ops.contains(&("write", 0)));
        assert_eq!((snap.dek_cache_hits, snap.dek_cache_misses), (2, 1));
        assert_eq!(
            (snap.bytes_read, snap.bytes_written, snap.tamper_detections),
            (10, 7, 1)
        );
    }
}
