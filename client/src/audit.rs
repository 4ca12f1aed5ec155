//! The audit log's line format and hash chain, shared by kmsd (which
//! writes `STATE/audit.log`) and `kmsctl audit verify` (which checks it),
//! so that both sides agree on one definition.
//!
//! # Format
//!
//! One JSON object per line, fields in this order:
//!
//! ```text
//! {"seq":3,"time":"2026-11-25T21:30:00.123456Z","uid":1000,"pid":4242,"op":"unwrap",
//!  "key":"<key id or name>","version":2,"outcome":"decrypt-failed","hash":"<64 hex>"}
//! ```
//!
//! `pid`, `key` and `version` are `null` when unknown; a chain-break line
//! adds a `detail` before `hash`. Lines never carry key material,
//! plaintext or blobs.
//!
//! # Chain
//!
//! `hash_n = SHA-256(hash_{n-1} || body_n)`, where `hash_0` is 32 zero
//! bytes and `body_n` is the line's bytes up to (not including) the final
//! `,"hash":"` — everything but its own hash. The hash is hex and the last
//! field, so a verifier works on the bytes as written and never
//! re-serializes. `seq` is the line's 1-based number in the file.
//!
//! Editing a line breaks its own hash; deleting, inserting or reordering
//! lines breaks `seq` and the next hash. Removing whole lines from the
//! *end* is not visible in the file alone: compare the last hash with the
//! copy each line also sent to journald.
//!
//! A line whose `op` is [`CHAIN_BREAK_OP`] starts a new chain (its
//! `hash_{n-1}` is zeros). kmsd writes one when it finds at start that the
//! file does not verify, so that it keeps serving keys while the break
//! stays visible: the verifier still reports the earlier break.

use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Length of a chain hash in bytes.
pub const HASH_LEN: usize = 32;
/// `op` of the line kmsd writes when it continues after a broken chain.
pub const CHAIN_BREAK_OP: &str = "audit-chain-break";
/// What separates a line's body from its hash.
const HASH_FIELD: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_FIELD.len() + 2 * HASH_LEN + 2;

/// The fields of one audit line, apart from `seq` and `hash`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC.
    pub time: String,
    pub uid: u32,
    pub pid: Option<i32>,
    pub op: &'a str,
    /// Key id, or the name the caller gave when no id is known.
    pub key: Option<&'a str>,
    pub version: Option<u32>,
    /// `ok` or the error code.
    pub outcome: &'a str,
    /// Only on chain-break lines: what was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

impl Entry<'_> {
    /// The JSON fields without braces, ready for [`Chain::seal`]. Building
    /// this needs no ordering, so writers do it outside any lock.
    pub fn fields(&self) -> String {
        let mut s = serde_json::to_string(self).expect("an audit entry always serializes");
        s.pop();
        s.remove(0);
        s
    }
}

/// The current time as RFC 3339 UTC with microseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Where a chain stands: the number and hash of its last line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    seq: u64,
    hash: [u8; HASH_LEN],
}

impl Chain {
    /// The state before the first line of a file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of the last line.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A new chain whose first line is line `lines + 1` of the file: where
    /// a chain-break line goes.
    pub fn after_break(lines: u64) -> Self {
        Self {
            seq: lines,
            hash: [0; HASH_LEN],
        }
    }

    /// The next line (with its newline) for `fields` (from
    /// [`Entry::fields`]), advancing the chain.
    pub fn seal(&mut self, fields: &str) -> String {
        let seq = self.seq + 1;
        let mut line = format!("{{\"seq\":{seq},{fields}");
        let hash = chain_hash(&self.hash, line.as_bytes());
        line.push_str(HASH_FIELD);
        line.push_str(&hex(&hash));
        line.push_str("\"}\n");
        (self.seq, self.hash) = (seq, hash);
        line
    }

    /// Checks that `line` (without newline) is the next line of this
    /// chain and advances past it.
    fn check(&mut self, line: &[u8]) -> Result<(), String> {
        let parsed = parse(line)?;
        if parsed.op == CHAIN_BREAK_OP {
            return Err("a chain-break line where the chain was intact".into());
        }
        self.advance(&parsed)
    }

    /// Advances past a parsed line if its number and hash follow.
    fn advance(&mut self, parsed: &Parsed<'_>) -> Result<(), String> {
        if parsed.seq != self.seq + 1 {
            return Err(format!(
                "seq {} where {} was expected (lines deleted, inserted or reordered)",
                parsed.seq,
                self.seq + 1
            ));
        }
        let hash = chain_hash(&self.hash, parsed.body);
        if hex(&hash) != parsed.hash {
            return Err("hash does not match (this line was edited, or one before it removed)".into());
        }
        (self.seq, self.hash) = (parsed.seq, hash);
        Ok(())
    }
}

fn chain_hash(prev: &[u8; HASH_LEN], body: &[u8]) -> [u8; HASH_LEN] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// A line split into the parts the chain needs.
struct Parsed<'a> {
    body: &'a [u8],
    hash: &'a str,
    seq: u64,
    op: String,
}

#[derive(Deserialize)]
struct Head {
    seq: u64,
    op: String,
}

fn parse(line: &[u8]) -> Result<Parsed<'_>, String> {
    let not_audit = || "not an audit line".to_string();
    let split = line.len().checked_sub(SUFFIX_LEN).ok_or_else(not_audit)?;
    let (body, suffix) = line.split_at(split);
    let hash = suffix
        .strip_prefix(HASH_FIELD.as_bytes())
        .and_then(|s| s.strip_suffix(b"\"}"))
        .and_then(|h| std::str::from_utf8(h).ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .ok_or_else(not_audit)?;
    let head: Head = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    Ok(Parsed {
        body,
        hash,
        seq: head.seq,
        op: head.op,
    })
}

/// A place where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// 1-based line number.
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "broken at line {}: {}", self.line, self.reason)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Lines read, including broken ones.
    pub lines: u64,
    /// Every break, in file order. After a break, lines are not checked
    /// until a chain-break line starts a new chain.
    pub breaks: Vec<Break>,
    /// Where the chain stands after the last line, if it is intact there
    /// (possibly in a new chain started after a break).
    #[serde(skip)]
    pub tail: Option<Chain>,
    /// Whether the file ends with a newline (false: a torn last write).
    pub complete: bool,
}

impl Report {
    /// True when no line is broken.
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks an audit log read from `r`.
///
/// # Errors
/// Only when reading fails; a broken chain is reported in [`Report`].
pub fn verify(mut r: impl BufRead) -> io::Result<Report> {
    let mut report = Report {
        lines: 0,
        breaks: Vec::new(),
        tail: Some(Chain::new()),
        complete: true,
    };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(report);
        }
        report.lines += 1;
        let line = report.lines;
        let Some(text) = buf.strip_suffix(b"\n") else {
            report.complete = false;
            report.tail = None;
            let reason = "incomplete line without newline (a torn write or a truncated file)".into();
            report.breaks.push(Break { line, reason });
            return Ok(report);
        };
        check_line(&mut report, line, text);
    }
}

fn check_line(report: &mut Report, line: u64, text: &[u8]) {
    match &mut report.tail {
        Some(chain) => {
            if let Err(reason) = chain.check(text) {
                report.breaks.push(Break { line, reason });
                report.tail = None;
            }
        }
        // Broken: only a chain-break line at its own number starts anew.
        None => {
            let mut fresh = Chain::after_break(line - 1);
            let restarts = parse(text).is_ok_and(|p| p.op == CHAIN_BREAK_OP && fresh.advance(&p).is_ok());
            if restarts {
                report.tail = Some(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op: &str, outcome: &str) -> String {
        Entry {
            time: "2026-01-01T00:00:00.000000Z".into(),
            uid: 1000,
            pid: Some(42),
            op,
            key: Some("app"),
            version: Some(1),
            outcome,
            detail: None,
        }
        .fields()
    }

    fn log(n: usize) -> Vec<String> {
        let mut chain = Chain::new();
        (0..n)
            .map(|i| chain.seal(&entry("wrap", if i % 2 == 0 { "ok" } else { "permission-denied" })))
            .collect()
    }

    fn check(lines: &[String]) -> Report {
        verify(lines.concat().as_bytes()).unwrap()
    }

    fn first_break(lines: &[String]) -> Break {
        check(lines).breaks.first().cloned().expect("a break")
    }

    #[test]
    fn sealed_lines_are_json_with_the_fields_in_order() {
        let line = &log(1)[0];
        assert!(line.starts_with(
            "{\"seq\":1,\"time\":\"2026-01-01T00:00:00.000000Z\",\"uid\":1000,\"pid\":42,\"op\":\"wrap\",\"key\":\"app\",\"version\":1,\"outcome\":\"ok\",\"hash\":\""
        ), "{line}");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn an_untouched_log_verifies_and_an_empty_one_too() {
        let lines = log(5);
        let r = check(&lines);
        assert!(r.is_intact() && r.complete);
        assert_eq!(r.lines, 5);
        assert_eq!(r.tail.unwrap().seq(), 5);
        assert!(check(&[]).is_intact());
    }

    #[test]
    fn an_edited_line_is_named() {
        let mut lines = log(5);
        lines[2] = lines[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
        let b = first_break(&lines);
        assert_eq!(b.line, 3);
        assert!(b.reason.contains("hash"), "{b}");
    }

    #[test]
    fn a_rehashed_edit_breaks_the_next_line() {
        let mut lines = log(5);
        let mut chain = Chain::new();
        for l in &lines[..2] {
            chain.check(l.trim_end().as_bytes()).unwrap();
        }
        lines[2] = chain.seal(&entry("wrap", "forged"));
        assert_eq!(first_break(&lines).line, 4);
    }

    #[test]
    fn deleted_and_reordered_lines_are_found() {
        let mut lines = log(5);
        lines.remove(1);
        let b = first_break(&lines);
        assert_eq!(b.line, 2);
        assert!(b.reason.contains("seq 3"), "{b}");
        let mut lines = log(5);
        lines.swap(1, 2);
        assert_eq!(first_break(&lines).line, 2);
    }

    #[test]
    fn a_truncated_last_line_and_appended_garbage_are_found() {
        let lines = log(3);
        let all = lines.concat();
        let r = verify(&all.as_bytes()[..all.len() - 10]).unwrap();
        assert!(!r.complete && r.tail.is_none());
        assert_eq!(r.breaks[0].line, 3);
        let mut lines = log(3);
        lines.push("hello\n".into());
        let b = first_break(&lines);
        assert_eq!((b.line, b.reason.as_str()), (4, "not an audit line"));
    }

    #[test]
    fn a_chain_break_line_starts_a_new_chain_but_the_break_stays_reported() {
        let mut lines = log(3);
        lines[1] = lines[1].replace("\"uid\":1000", "\"uid\":0");
        let mut chain = Chain::after_break(3);
        let detail = Entry {
            detail: Some("line 2"),
            ..break_entry()
        };
        lines.push(chain.seal(&detail.fields()));
        lines.push(chain.seal(&entry("wrap", "ok")));
        let r = check(&lines);
        assert_eq!(r.breaks.len(), 1);
        assert_eq!(r.breaks[0].line, 2);
        assert_eq!(r.tail.map(|c| c.seq()), Some(5));
    }

    fn break_entry() -> Entry<'static> {
        Entry {
            time: "2026-01-01T00:00:00.000000Z".into(),
            uid: 0,
            pid: None,
            op: CHAIN_BREAK_OP,
            key: None,
            version: None,
            outcome: "broken",
            detail: None,
        }
    }

    #[test]
    fn a_chain_break_line_in_an_intact_chain_is_itself_a_break() {
        let mut lines = log(2);
        let mut chain = Chain::after_break(2);
        lines.push(chain.seal(&break_entry().fields()));
        assert_eq!(first_break(&lines).line, 3);
    }
}
