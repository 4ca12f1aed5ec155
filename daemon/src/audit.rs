//! The audit log: one hash-chained JSON line per key operation, appended to
//! `STATE/audit.log` (mode 0600) and sent to the log at info with target
//! `kmsd::audit` (journald or stderr). The line format and chain rule are
//! defined once, in [`kms_client::audit`], which `kmsctl audit verify`
//! shares.
//!
//! What is recorded follows each operation's audit class
//! ([`kms_client::proto::AuditClass`], in its descriptor): every answered
//! key-management request (create,
//! describe, rotate, enable, disable, rotation settings, deletion,
//! replication, fs rewrap/versions ...), every failed request of any kind
//! (permission-denied and decrypt-failed matter most), successful data
//! operations (encrypt, decrypt, wrap, unwrap, generate, re-encrypt) only
//! with `[audit] data_operations = true` -- at hundreds of thousands per
//! second they would halve throughput and fill the disk; metrics count
//! them -- and the scheduler's automatic rotations and deletions
//! (uid 0 and kmsd's own pid, ops `auto-rotate`, `auto-delete`,
//! `auto-failed`). Only time, uid, pid, operation, key, version and
//! outcome: never material, plaintext or blobs.
//!
//! Writing: the request path only formats the fields and queues them; one
//! writer thread assigns `seq`, chains, and appends whatever is queued
//! with one `write(2)` on an `O_APPEND` descriptor, in the order recorded.
//! Writing on the request path, under a mutex, halved wrap/unwrap
//! throughput at 16 connections in kms-bench. The price: a request is
//! answered before its line is written. There is no fsync: lines are
//! written before kmsd exits on SIGTERM/SIGINT ([`AuditLog::flush`]), but a
//! crash can lose the lines still queued (milliseconds' worth) and a power
//! loss the last lines written. A failed write is logged and requests are
//! still answered.
//!
//! At start the whole file is verified. A broken chain does not stop kmsd
//! from serving keys: it logs an error and appends an `audit-chain-break`
//! line that starts a new chain, so the break stays visible to `kmsctl
//! audit verify` and in the log.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use kms_client::audit::{self, Chain, Entry, CHAIN_BREAK_OP};
use kms_client::proto::AuditClass;

use crate::keys::service::DueReport;
use crate::observe::{Observation, Observer};

/// File name of the audit log in the state directory.
pub const FILE_NAME: &str = "audit.log";

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {op}")]
pub struct AuditError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Most messages queued for the writer thread; beyond it, callers wait
/// (back-pressure rather than unbounded memory). A line is short (its key
/// text is cut to `observe::MAX_KEY_TEXT` bytes, and nothing else in it
/// comes from the caller but numbers), so the queue holds a few MiB at
/// most. A caller on an async worker that finds it full waits through
/// `block_in_place`, so the runtime moves its other tasks elsewhere: the
/// wait slows that caller, not the daemon.
const QUEUE: usize = 16 * 1024;
/// Most lines written with one `write(2)`.
const BATCH: usize = 512;

/// What the writer thread is sent.
#[derive(Debug)]
enum Msg {
    /// The fields of one line ([`Entry::fields`]).
    Line(String),
    /// Answered once every message before it is written.
    Flush(mpsc::Sender<()>),
}

/// The open audit log. Lines are sealed and written, in the order they
/// were recorded, by a dedicated thread; [`AuditLog::flush`] waits for it.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// kmsd's own pid, for the scheduler's entries.
    pid: i32,
    tx: Option<mpsc::SyncSender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Record successful data operations too (`[audit] data_operations`).
    data_operations: std::sync::atomic::AtomicBool,
}

/// The file and where its chain stands; owned by the writer thread.
#[derive(Debug)]
struct Writer {
    file: File,
    chain: Chain,
    path: PathBuf,
}

impl Writer {
    /// Seals and appends `lines` with one write; the chain advances only
    /// when the write succeeds. A write that fails part-way (disk full: a
    /// short write, then ENOSPC) is cut off again, so the next line does not
    /// land on a torn one and the file stays checkable.
    fn append(&mut self, lines: &[String]) -> std::io::Result<String> {
        let mut next = self.chain.clone();
        let text: String = lines.iter().map(|fields| next.seal(fields)).collect();
        let before = self.file.metadata()?.len();
        if let Err(e) = (&self.file).write_all(text.as_bytes()) {
            if let Err(t) = self.file.set_len(before) {
                tracing::error!(path = %self.path.display(), error = %t, "cannot cut a partly written audit line off");
            }
            return Err(e);
        }
        self.chain = next;
        Ok(text)
    }

    /// Writes batches until every sender is gone.
    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        let mut lines = Vec::with_capacity(BATCH);
        let mut acks = Vec::new();
        while let Ok(first) = rx.recv() {
            for msg in std::iter::once(first).chain(rx.try_iter().take(BATCH - 1)) {
                match msg {
                    Msg::Line(l) => lines.push(l),
                    Msg::Flush(ack) => acks.push(ack),
                }
            }
            match self.append(&lines) {
                Ok(text) => text.lines().for_each(|l| tracing::info!(target: "kmsd::audit", "{l}")),
                Err(e) => tracing::error!(
                    path = %self.path.display(), error = %e, lost = lines.len(), "cannot write the audit log"
                ),
            }
            lines.clear();
            acks.drain(..).for_each(|a| {
                let _ = a.send(());
            });
        }
    }
}

impl AuditLog {
    /// Whether successful data operations are recorded too (config load
    /// and reload).
    pub fn set_data_operations(&self, on: bool) {
        self.data_operations.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens (or creates) `STATE/audit.log`, verifies it, continues its
    /// chain (a broken chain gets a chain-break line, see the module doc)
    /// and starts the writer thread.
    ///
    /// # Errors
    /// When the file cannot be opened, read, or appended to.
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = state_dir.join(FILE_NAME);
        let err = |op| {
            let path = path.clone();
            move |source| AuditError { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(err("cannot open"))?;
        let report = audit::verify(BufReader::new(&file)).map_err(err("cannot read"))?;
        let mut log = Self {
            path: path.clone(),
            pid: std::process::id().try_into().unwrap_or(i32::MAX),
            tx: None,
            thread: None,
            data_operations: std::sync::atomic::AtomicBool::new(false),
        };
        let mut writer = Writer {
            file,
            chain: report.tail.clone().unwrap_or_else(|| Chain::after_break(report.lines)),
            path: path.clone(),
        };
        if report.tail.is_none() {
            log.record_break(&mut writer, &report).map_err(err("cannot append"))?;
        } else if let Some(b) = report.breaks.first() {
            tracing::error!(path = %path.display(), "audit log chain {b} (recorded earlier); later lines form a new chain");
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("kmsd-audit".into())
            .spawn(move || writer.run(&rx))
            .map_err(err("cannot start the writer thread"))?;
        (log.tx, log.thread) = (Some(tx), Some(thread));
        Ok(log)
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Completes a torn last line and appends the chain-break line.
    fn record_break(&self, w: &mut Writer, report: &audit::Report) -> std::io::Result<()> {
        let b = report.breaks.last().expect("a broken chain has a break");
        tracing::error!(
            path = %self.path.display(),
            "audit log chain {b}; kmsd keeps serving and starts a new chain with an {CHAIN_BREAK_OP} line"
        );
        if !report.complete {
            (&w.file).write_all(b"\n")?;
        }
        let detail = b.to_string();
        let entry = Entry {
            detail: Some(&detail),
            ..self.internal(CHAIN_BREAK_OP, None, None, "broken")
        };
        let text = w.append(&[entry.fields()])?;
        tracing::info!(target: "kmsd::audit", "{}", text.trim_end());
        Ok(())
    }

    /// An entry made by kmsd itself: uid 0 and kmsd's pid.
    fn internal<'a>(&self, op: &'a str, key: Option<&'a str>, version: Option<u32>, outcome: &'a str) -> Entry<'a> {
        Entry {
            time: audit::now_rfc3339(),
            uid: 0,
            pid: Some(self.pid),
            op,
            key,
            version,
            outcome,
            detail: None,
        }
    }

    /// Queues one entry for the writer thread (waiting only when its queue
    /// is full). A failed write is logged there; requests are answered
    /// regardless.
    pub fn record(&self, entry: &Entry<'_>) {
        self.send(Msg::Line(entry.fields()));
    }

    /// Waits until every entry recorded before is written.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        self.send(Msg::Flush(ack));
        let _ = done.recv();
    }

    fn send(&self, msg: Msg) {
        let sent = self.tx.as_ref().is_some_and(|tx| match tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Full(msg)) => in_place(|| tx.send(msg).is_ok()),
            Err(mpsc::TrySendError::Disconnected(_)) => false,
        });
        if !sent {
            tracing::error!(path = %self.path.display(), "the audit writer thread is gone; entry lost");
        }
    }

    /// Records what one scheduler pass did.
    pub fn record_due(&self, report: &DueReport) {
        for (id, version) in &report.rotated {
            let id = id.to_string();
            self.record(&self.internal("auto-rotate", Some(&id), Some(*version), "ok"));
        }
        for id in &report.deleted {
            let id = id.to_string();
            self.record(&self.internal("auto-delete", Some(&id), None, "ok"));
        }
        for (id, e) in &report.failed {
            let id = id.to_string();
            self.record(&self.internal("auto-failed", Some(&id), None, e.code().as_str()));
        }
    }
}

/// Runs `f`, which may block, telling a multi-threaded tokio runtime
/// first when called on one of its workers.
fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Observer for AuditLog {
    fn observe(&self, o: &Observation<'_>) {
        let recorded = match o.subject.op.info().audit {
            AuditClass::Unaudited => false,
            AuditClass::Management => true,
            AuditClass::Data => o.outcome() != "ok" || self.data_operations.load(std::sync::atomic::Ordering::Relaxed),
        };
        if !recorded {
            return;
        }
        let (key, version) = o.key_and_version();
        self.record(&Entry {
            time: audit::now_rfc3339(),
            uid: o.caller.uid,
            pid: o.caller.pid,
            op: o.subject.op.name(),
            key: key.as_deref(),
            version,
            outcome: o.outcome(),
            detail: None,
        });
    }
}

impl Drop for AuditLog {
    /// Writes what is queued before the log goes away.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(op: &str) -> Entry<'_> {
        Entry {
            time: audit::now_rfc3339(),
            uid: 1000,
            pid: Some(7),
            op,
            key: Some("app"),
            version: Some(1),
            outcome: "ok",
            detail: None,
        }
    }

    fn verify(dir: &Path) -> audit::Report {
        audit::verify(BufReader::new(File::open(dir.join(FILE_NAME)).unwrap())).unwrap()
    }

    fn read(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(FILE_NAME)).unwrap()
    }

    #[test]
    fn the_chain_continues_across_reopen_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::testutil::private_dir().unwrap();
        AuditLog::open(dir.path()).unwrap().record(&entry("wrap"));
        let log = AuditLog::open(dir.path()).unwrap();
        log.record(&entry("unwrap"));
        log.flush();
        let r = verify(dir.path());
        assert!(r.is_intact(), "{r:?}");
        assert_eq!(r.lines, 2);
        let mode = std::fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn concurrent_writers_keep_a_valid_chain() {
        let dir = crate::testutil::private_dir().unwrap();
        let log = Arc::new(AuditLog::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || (0..200).for_each(|_| log.record(&entry("wrap"))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        log.flush();
        let r = verify(dir.path());
        assert!(r.is_intact(), "{:?}", r.breaks);
        assert_eq!(r.lines, 1600);
    }

    #[test]
    fn a_tampered_log_gets_one_chain_break_line_and_a_new_chain() {
        let dir = crate::testutil::private_dir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        (0..3).for_each(|_| log.record(&entry("wrap")));
        drop(log);
        let edited = read(dir.path()).replacen("\"uid\":1000", "\"uid\":0", 1);
        std::fs::write(dir.path().join(FILE_NAME), edited).unwrap();
        AuditLog::open(dir.path()).unwrap().record(&entry("unwrap"));
        // A second start does not add another break line.
        AuditLog::open(dir.path()).unwrap().record(&entry("unwrap"));
        let r = verify(dir.path());
        assert_eq!(r.breaks.len(), 1);
        assert_eq!(r.breaks[0].line, 1);
        assert_eq!(r.tail.map(|c| c.seq()), Some(6));
        let text = read(dir.path());
        assert_eq!(text.matches(CHAIN_BREAK_OP).count(), 1);
        assert!(text.lines().nth(3).unwrap().contains("broken at line 1"));
    }

    #[test]
    fn a_torn_last_line_is_completed_before_the_break_line() {
        let dir = crate::testutil::private_dir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        (0..2).for_each(|_| log.record(&entry("wrap")));
        drop(log);
        let text = read(dir.path());
        std::fs::write(dir.path().join(FILE_NAME), &text[..text.len() - 5]).unwrap();
        AuditLog::open(dir.path()).unwrap().record(&entry("wrap"));
        let r = verify(dir.path());
        assert!(r.complete);
        assert_eq!(r.breaks.len(), 1);
        assert_eq!(r.breaks[0].line, 2);
        assert_eq!(r.tail.map(|c| c.seq()), Some(4));
    }
}
