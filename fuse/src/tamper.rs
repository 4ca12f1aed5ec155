//! How many tamper warnings reach the log. Whoever can write into the
//! backing directory can make tampered entries by the thousand, so the log
//! must be bounded; but a budget that runs out would let them spend it and
//! then tamper in silence. So: each backing path is logged once (until
//! [`SEEN_MAX`] paths were, then the memory starts over), through a token
//! bucket of [`BURST`] lines refilled at one a second; a line that finds the
//! bucket empty is suppressed and counted by folder, and the next line that
//! gets through is preceded by the count and the folders (up to
//! [`FOLDERS_MAX`] of them), so that a one-off tamper hidden in another
//! folder's flood is still named, by its folder, within about a second
//! while the flood goes on. Every detection is also counted in the
//! filesystem's statistics (`kmsd_fs_tamper_detections_total`), suppressed
//! or not.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Tamper lines logged at once before the rate limit applies.
pub const BURST: u32 = 60;
/// One more line allowed per this long.
pub const REFILL: Duration = Duration::from_secs(1);
/// Distinct paths remembered as logged; then forgotten all at once.
pub const SEEN_MAX: usize = 10_000;
/// Folders named in one summary of suppressed warnings; more are counted
/// as "other folders".
pub const FOLDERS_MAX: usize = 32;

/// What to do with one tamper warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This path was logged already.
    Repeat,
    /// Over the rate limit: counted, logged later as a number.
    Suppressed,
    /// Log it, after a line saying that `suppressed` warnings were not
    /// logged (if any), and in which folders (warnings by folder).
    Log {
        suppressed: u64,
        folders: Vec<(PathBuf, u64)>,
    },
}

/// The rate limiter of tamper warnings of one filesystem.
#[derive(Debug)]
pub struct TamperLog {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    seen: HashSet<PathBuf>,
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
    /// Suppressed warnings by folder, up to [`FOLDERS_MAX`] folders.
    folders: BTreeMap<PathBuf, u64>,
}

impl Default for TamperLog {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl TamperLog {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                seen: HashSet::new(),
                tokens: BURST,
                refilled: now,
                suppressed: 0,
                folders: BTreeMap::new(),
            }),
        }
    }

    /// Whether the warning about `path` at `now` is logged.
    pub fn admit(&self, path: &Path, now: Instant) -> Verdict {
        let mut inner = self.inner.lock();
        if inner.seen.contains(path) {
            return Verdict::Repeat;
        }
        inner.refill(now);
        if inner.tokens == 0 {
            inner.suppressed += 1;
            let folder = path.parent().unwrap_or(path).to_path_buf();
            if let Some(n) = inner.folders.get_mut(&folder) {
                *n += 1;
            } else if inner.folders.len() < FOLDERS_MAX {
                inner.folders.insert(folder, 1);
            }
            return Verdict::Suppressed;
        }
        inner.tokens -= 1;
        if inner.seen.len() >= SEEN_MAX {
            inner.seen.clear();
        }
        inner.seen.insert(path.to_path_buf());
        Verdict::Log {
            suppressed: std::mem::take(&mut inner.suppressed),
            folders: std::mem::take(&mut inner.folders).into_iter().collect(),
        }
    }

    /// Logs the warning about `path` if admitted now; `line` writes it.
    pub fn warn(&self, path: &Path, line: impl FnOnce()) {
        if let Verdict::Log { suppressed, folders } = self.admit(path, Instant::now()) {
            if suppressed > 0 {
                let named: u64 = folders.iter().map(|(_, n)| n).sum();
                let mut list: Vec<String> = folders.iter().map(|(f, n)| format!("{} ({n})", f.display())).collect();
                if named < suppressed {
                    list.push(format!("other folders ({})", suppressed - named));
                }
                let list = list.join(", ");
                tracing::warn!(
                    suppressed,
                    folders = %list,
                    "{suppressed} more tamper warnings were suppressed by the rate limit, in: {list} (all are \
                     counted in kmsd_fs_tamper_detections_total)"
                );
            }
            line();
        }
    }
}

impl Inner {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let add = elapsed.as_nanos() / REFILL.as_nanos();
        if add == 0 {
            return;
        }
        let add = u32::try_from(add).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(add).min(BURST);
        self.refilled = if self.tokens == BURST {
            now
        } else {
            self.refilled + REFILL * add
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: usize) -> PathBuf {
        PathBuf::from(format!("/backing/d/{i}"))
    }

    #[test]
    fn a_flood_is_rate_limited_but_a_later_tamper_is_logged_with_the_count() {
        let t0 = Instant::now();
        let log = TamperLog::new(t0);
        let mut logged = 0;
        for i in 0..20_000 {
            match log.admit(&p(i), t0) {
                Verdict::Log { suppressed, .. } => {
                    assert_eq!(suppressed, 0);
                    logged += 1;
                }
                Verdict::Suppressed => {}
                Verdict::Repeat => panic!("distinct paths"),
            }
        }
        assert_eq!(logged, BURST);
        // Two seconds later the real tampering gets its line, with the
        // number of lines the flood did not get.
        let later = t0 + 2 * REFILL;
        assert_eq!(
            log.admit(Path::new("/backing/real"), later),
            Verdict::Log {
                suppressed: 20_000 - u64::from(BURST),
                folders: vec![(PathBuf::from("/backing/d"), 20_000 - u64::from(BURST))],
            }
        );
        assert_eq!(log.admit(Path::new("/backing/real"), later), Verdict::Repeat);
        assert_eq!(
            log.admit(&p(99_999), later),
            Verdict::Log {
                suppressed: 0,
                folders: vec![]
            }
        );
        assert_eq!(log.admit(&p(99_998), later), Verdict::Suppressed);
    }

    #[test]
    fn a_steady_flood_still_lets_a_line_through_every_second() {
        let t0 = Instant::now();
        let log = TamperLog::new(t0);
        let mut logged = 0;
        for i in 0..10_000 {
            // 100 a second for 100 s.
            let now = t0 + Duration::from_millis(10 * i as u64);
            if matches!(log.admit(&p(i), now), Verdict::Log { .. }) {
                logged += 1;
            }
        }
        assert!((BURST + 99..=BURST + 100).contains(&logged), "{logged}");
    }

    #[test]
    fn paths_are_forgotten_after_seen_max_so_memory_stays_bounded() {
        let t0 = Instant::now();
        let log = TamperLog::new(t0);
        for i in 0..=SEEN_MAX {
            let now = t0 + REFILL * (i as u32 + 1);
            assert!(matches!(log.admit(&p(i), now), Verdict::Log { .. }));
        }
        assert!(log.inner.lock().seen.len() <= SEEN_MAX);
        let now = t0 + REFILL * (SEEN_MAX as u32 + 5);
        assert!(matches!(log.admit(&p(0), now), Verdict::Log { .. }), "logged again");
    }

    /// A one-off tamper in another folder, during a flood that keeps the
    /// bucket empty, is named by its folder in the next summary.
    #[test]
    fn a_one_off_tamper_hidden_in_a_flood_is_named_by_its_folder() {
        let t0 = Instant::now();
        let log = TamperLog::new(t0);
        for i in 0..100 {
            let _ = log.admit(&p(i), t0);
        }
        assert_eq!(log.admit(Path::new("/backing/secret/f"), t0), Verdict::Suppressed);
        for i in 100..200 {
            assert_eq!(log.admit(&p(i), t0), Verdict::Suppressed);
        }
        let Verdict::Log { suppressed, folders } = log.admit(&p(1000), t0 + REFILL) else {
            panic!("a line a second");
        };
        assert_eq!(suppressed, 141);
        assert!(folders.contains(&(PathBuf::from("/backing/secret"), 1)), "{folders:?}");
        // Folders beyond the cap are counted, not named.
        for f in 0..(FOLDERS_MAX + 10) {
            let _ = log.admit(Path::new(&format!("/backing/f{f}/x")), t0 + REFILL);
        }
        let Verdict::Log { suppressed, folders } = log.admit(&p(1001), t0 + 2 * REFILL) else {
            panic!("a line a second");
        };
        assert_eq!(suppressed, FOLDERS_MAX as u64 + 10);
        assert_eq!(folders.len(), FOLDERS_MAX);
    }
}
