//! End-to-end tests: the real `kmsd` and `kmsctl` binaries on temporary
//! sockets. One module per area.

mod cli;
mod lifecycle;
mod protocol;
mod schedule;
mod zones;
