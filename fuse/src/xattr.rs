//! `user.*` extended attributes, passed through to the backing inode by its
//! `/proc/self/fd` path. Other namespaces are refused: `trusted.*` and
//! `security.*` would act on the backing file with the daemon's privileges.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};

const USER_PREFIX: &[u8] = b"user.";

/// Largest value (Linux `XATTR_SIZE_MAX`).
pub const VALUE_MAX: u32 = 65_536;

fn cstr(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::Sys(nix::Error::EINVAL))
}

fn user_name(name: &OsStr, refuse: nix::Error) -> Result<CString> {
    if !name.as_bytes().starts_with(USER_PREFIX) {
        return Err(Error::Sys(refuse));
    }
    cstr(name.as_bytes())
}

fn check(ret: isize) -> Result<usize> {
    if ret < 0 {
        Err(Error::Sys(nix::Error::last()))
    } else {
        Ok(ret as usize)
    }
}

/// The value of `name` (or only its length when `size` is 0).
///
/// # Errors
/// `ENODATA` for missing or non-`user.` names, `ERANGE` when `size` is too
/// small, other errnos from the backing filesystem.
pub fn get(path: &Path, name: &OsStr, size: u32) -> Result<Vec<u8>> {
    let name = user_name(name, nix::Error::ENODATA)?;
    let path = cstr(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; size as usize];
    // SAFETY: both strings are NUL-terminated and live across the call; the
    // buffer pointer and length describe `buf` (a null-length read is allowed).
    let n = check(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    if size == 0 {
        return Ok(vec![0u8; n]);
    }
    buf.truncate(n);
    Ok(buf)
}

/// The NUL-separated list of `user.` names.
///
/// # Errors
/// Errnos from the backing filesystem.
pub fn list(path: &Path) -> Result<Vec<u8>> {
    let path = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: a null buffer of length 0 asks only for the needed size.
    let needed = check(unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; needed];
    // SAFETY: the buffer pointer and length describe `buf`.
    let n = check(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n);
    Ok(filter_user(&buf))
}

fn filter_user(list: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| n.starts_with(USER_PREFIX)) {
        out.extend_from_slice(name);
        out.push(0);
    }
    out
}

/// Sets `name` to `value` with `XATTR_CREATE`/`XATTR_REPLACE` `flags`.
///
/// # Errors
/// `EOPNOTSUPP` for non-`user.` names, other errnos from the backing
/// filesystem.
pub fn set(path: &Path, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
    let name = user_name(name, nix::Error::EOPNOTSUPP)?;
    let path = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings and a pointer/length pair for `value`.
    let ret = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    check(ret as isize).map(drop)
}

/// Removes `name`.
///
/// # Errors
/// `EOPNOTSUPP` for non-`user.` names, `ENODATA` when absent.
pub fn remove(path: &Path, name: &OsStr) -> Result<()> {
    let name = user_name(name, nix::Error::EOPNOTSUPP)?;
    let path = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let ret = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    check(ret as isize).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_names_are_listed() {
        let list = b"security.selinux\0user.a\0trusted.x\0user.bb\0";
        assert_eq!(filter_user(list), b"user.a\0user.bb\0");
    }

    #[test]
    fn round_trip_on_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        let name = OsStr::new("user.k");
        if let Err(e) = set(&p, name, b"v", 0) {
            // Only a backing filesystem without user xattrs may skip, and
            // never under CI, whose temporary directory has them.
            assert!(std::env::var_os("CI").is_none(), "user xattrs unusable under CI: {e:?}");
            eprintln!("backing fs has no user xattrs here: {e:?}");
            return;
        }
        assert_eq!(get(&p, name, 0).unwrap().len(), 1);
        assert_eq!(get(&p, name, 16).unwrap(), b"v");
        assert_eq!(list(&p).unwrap(), b"user.k\0");
        assert!(set(&p, OsStr::new("trusted.k"), b"v", 0).is_err());
        remove(&p, name).unwrap();
        assert!(get(&p, name, 16).is_err());
    }
}
