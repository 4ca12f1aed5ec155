//! A record's revision in a store: what compare-and-swap compares and what
//! orders changes. A leaf: the store's error type names it.

use std::fmt;

/// A record's revision: assigned by the store at each write (a store may
/// number them as it likes, e.g. etcd's `mod_revision`). A later write of a
/// store has a greater revision than every earlier one it made or reported,
/// so that a reader can drop a change older than what it holds. A store
/// never gives the same record the same revision twice while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(u64);

impl Revision {
    /// The revision numbered `n`.
    pub fn new(n: u64) -> Self {
        Self(n)
    }

    /// Its number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revision {}", self.0)
    }
}
