//! kms-fuse
