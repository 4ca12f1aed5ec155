//! kms-client: the kmsd wire protocol ([`proto`]) and clients for it.
#![forbid(unsafe_code)]

pub mod blob;
pub mod proto;
