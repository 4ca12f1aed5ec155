//! The schema number this build writes: a leaf, so that the store's error
//! type can name it without reaching the record types.

/// The schema this build writes.
pub const CURRENT: u32 = 2;
