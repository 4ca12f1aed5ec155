//! The heart of kmsd: versioned keys, rotation rules, envelope crypto and
//! the durable encrypted store. No sockets and no FUSE here; the server,
//! the scheduler and the filesystem are thin layers over [`KeyService`].

pub mod clock;
pub mod crypto;
pub mod error;
pub mod lifecycle;
pub mod material;
pub mod model;
pub mod policy;
pub mod replica;
pub mod rotation;
pub mod service;
pub mod store;

#[cfg(test)]
mod tests;

pub use clock::{Clock, ManualClock, SystemClock, DAY};
pub use error::{Error, Result};
pub use policy::Caller;
pub use service::{DueReport, KeyEntry, KeyService};
pub use store::{FileStore, KeyStore, RootKey, StoreError};
