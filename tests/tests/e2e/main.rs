//! End-to-end tests: the real `kmsd` and `kmsctl` binaries on temporary
//! sockets. One module per area.

mod cli;
mod fs;
mod lifecycle;
mod metrics;
mod protocol;
mod reload;
mod schedule;
mod zones;
