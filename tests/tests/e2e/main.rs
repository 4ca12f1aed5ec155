//! End-to-end tests: the real `kmsd` and `kmsctl` binaries on temporary
//! sockets. One module per area.

mod acl;
mod audit;
mod backup;
mod claims;
mod cli;
mod crash;
mod disk;
mod etcd;
mod fs;
mod hardening;
mod kubernetes;
mod lifecycle;
mod limits;
mod metrics;
mod power;
mod privsep;
mod protocol;
mod reload;
mod schedule;
mod soak;
mod systemd;
mod upgrade;
mod workload;
mod zones;
