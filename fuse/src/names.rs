//! Encrypted names: file names, symlink targets and `user.*` extended
//! attributes, under keys derived from the mount's name key. FORMAT.md,
//! "Names", is the reasoning; this module is the pure functions (no I/O)
//! plus the root file `kmsd.names` and the directory-id file.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;

use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kms_client::proto::Context;
use nix::fcntl::{openat, openat2, renameat2, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fault;
use crate::format::{Header, HEADER_LEN};
use crate::keys::{Dek, KeyError, KeySource, FORMAT_CONTEXT_KEY};

/// The root file whose presence makes a backing directory one with
/// encrypted names; it holds the wrapped name key.
pub const ROOT_FILE: &str = "kmsd.names";
/// Where `kmsd.names` is written before it is renamed into place.
pub const ROOT_TMP: &str = "kmsd.names.tmp";
/// The directory-id file inside every directory but the root.
pub const DIR_ID_FILE: &str = "kmsd.dirid";
const DIR_ID_TMP: &str = "kmsd.dirid.tmp.";
/// Prefix of the backing name of a long name.
pub const LONG_PREFIX: &str = "kmsd.L.";
/// Suffix of the file holding a long name's encrypted form.
pub const LONG_SUFFIX: &str = ".name";
/// The encryption-context key binding the name key's blob to its root id.
pub const NAMES_CONTEXT_KEY: &str = "kms-fuse.names";

/// Longest plaintext name (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest plaintext name that has a short (single-entry) form on a
/// backing filesystem with 255-byte names (ext4, XFS, btrfs, tmpfs...).
pub const SHORT_MAX: usize = 175;
/// Longest backing name the mount uses: the backing filesystem's limit
/// (`statvfs` `f_namemax`), but never above 255, so that a backing directory
/// reads the same on every filesystem that allows 255-byte names.
pub const BACKING_NAME_MAX: usize = 255;
/// Shortest backing name limit that holds the long form: its `.name`
/// part's name (`kmsd.L.` + 43 + `.name`, 55 bytes) is the longest name the
/// mount makes (its temporary names are at most 31 bytes).
pub const BACKING_NAME_MIN: usize = LONG_PREFIX.len() + b64_len(32) + LONG_SUFFIX.len();
/// Longest plaintext symlink target (its backing form must fit 4,095 bytes).
pub const TARGET_MAX: usize = 3039;
/// Longest xattr name after `user.`.
pub const XATTR_NAME_MAX: usize = 171;
/// Longest plaintext xattr value (`XATTR_SIZE_MAX` less the overhead).
pub const XATTR_VALUE_MAX: usize = 65_536 - OVERHEAD;

/// Length of a directory id.
pub const DIR_ID_LEN: usize = 16;
/// A directory's id: the associated data of every name in it.
pub type DirId = [u8; DIR_ID_LEN];

const NONCE_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Bytes a nonce-based seal adds (symlink targets, xattr values).
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const USER: &[u8] = b"user.";

/// Why a name cannot be encrypted or decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name too long")]
    TooLong,
    #[error("not a valid name")]
    Invalid,
    #[error("name does not authenticate")]
    Auth,
}

impl From<NameError> for nix::Error {
    fn from(e: NameError) -> Self {
        match e {
            NameError::TooLong => nix::Error::ENAMETOOLONG,
            NameError::Invalid => nix::Error::EINVAL,
            NameError::Auth => nix::Error::EIO,
        }
    }
}

/// The three AES-SIV keys of a mount, derived from its name key.
pub struct NameKeys {
    names: Zeroizing<[u8; 64]>,
    symlinks: Zeroizing<[u8; 64]>,
    xattrs: Zeroizing<[u8; 64]>,
    root_id: DirId,
    /// Longest short-form backing name (see [`backing_limit`]).
    backing_max: usize,
}

impl std::fmt::Debug for NameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameKeys([redacted])")
    }
}

fn siv(key: &[u8; 64]) -> Aes256Siv {
    Aes256Siv::new(key.into())
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(s: &[u8]) -> Result<Vec<u8>, NameError> {
    URL_SAFE_NO_PAD.decode(s).map_err(|_| NameError::Auth)
}

/// Length of base64url without padding of `n` bytes.
const fn b64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// What a backing name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// The short form of an encrypted name.
    Short(&'a [u8]),
    /// A long name's entry (`kmsd.L.<hash>`), with its hash.
    Long(&'a [u8]),
    /// Something the mount keeps for itself or ignores (has a `.`).
    Reserved,
}

/// Classifies a backing name of a directory with encrypted names.
pub fn classify(name: &OsStr) -> Kind<'_> {
    let b = name.as_bytes();
    if !b.contains(&b'.') {
        return Kind::Short(b);
    }
    match b.strip_prefix(LONG_PREFIX.as_bytes()) {
        Some(hash) if hash.len() == b64_len(32) && !hash.contains(&b'.') => Kind::Long(hash),
        _ => Kind::Reserved,
    }
}

/// The backing form of one plaintext name in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    Short(OsString),
    /// `entry` is `kmsd.L.<hash>`; `part` (`entry.name`) holds `content`.
    Long {
        entry: OsString,
        part: OsString,
        content: String,
    },
}

impl Backing {
    /// The directory entry's name.
    pub fn entry(&self) -> &OsStr {
        match self {
            Backing::Short(n) => n,
            Backing::Long { entry, .. } => entry,
        }
    }

    /// The long-name part's name, if long.
    pub fn part(&self) -> Option<&OsStr> {
        match self {
            Backing::Short(_) => None,
            Backing::Long { part, .. } => Some(part),
        }
    }
}

/// The longest backing name the mount makes on a filesystem whose names
/// hold at most `namemax` bytes (its `statvfs` `f_namemax`): `namemax`
/// capped at [`BACKING_NAME_MAX`]; `None` when it is below
/// [`BACKING_NAME_MIN`] (too short for the long form's names).
pub fn backing_limit(namemax: u64) -> Option<usize> {
    if namemax < BACKING_NAME_MIN as u64 {
        return None;
    }
    Some(usize::try_from(namemax).map_or(BACKING_NAME_MAX, |n| n.min(BACKING_NAME_MAX)))
}

/// The longest plaintext name stored in the short form when backing names
/// hold at most `backing_max` bytes: `n` fits while
/// `ceil(4 * (16 + n) / 3) <= backing_max`.
pub const fn short_max(backing_max: usize) -> usize {
    let n = (backing_max * 3 / 4).saturating_sub(TAG_LEN);
    if n > NAME_MAX {
        NAME_MAX
    } else {
        n
    }
}

/// `kmsd.L.<hash>` for the short-form string `short`.
pub fn long_entry(short: &str) -> String {
    format!("{LONG_PREFIX}{}", b64(&Sha256::digest(short.as_bytes())))
}

/// The long-name part's name of the entry `entry` (`kmsd.L.<hash>`).
pub fn part_of(entry: &OsStr) -> OsString {
    let mut p = entry.to_os_string();
    p.push(LONG_SUFFIX);
    p
}

impl NameKeys {
    /// The keys of a mount whose name key is `master` and root id `root_id`
    /// (HKDF-SHA256, salt the root id).
    pub fn derive(master: &Dek, root_id: &DirId) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(root_id), master.expose());
        let key = |info: &[u8]| {
            let mut k = Zeroizing::new([0u8; 64]);
            hk.expand(info, k.as_mut()).expect("64 bytes is a valid HKDF length");
            k
        };
        Self {
            names: key(b"kms-fuse names v1"),
            symlinks: key(b"kms-fuse symlinks v1"),
            xattrs: key(b"kms-fuse xattrs v1"),
            root_id: *root_id,
            backing_max: BACKING_NAME_MAX,
        }
    }

    /// These keys for a backing filesystem whose names hold at most
    /// `backing_max` bytes (from [`backing_limit`]): longer short forms
    /// take the long form.
    #[must_use]
    pub fn with_backing_max(mut self, backing_max: usize) -> Self {
        self.backing_max = backing_max.clamp(BACKING_NAME_MIN, BACKING_NAME_MAX);
        self
    }

    /// The longest plaintext name with a short form under these keys.
    pub fn short_max(&self) -> usize {
        short_max(self.backing_max)
    }

    /// The root directory's id.
    pub fn root_id(&self) -> &DirId {
        &self.root_id
    }

    /// The backing form of `name` in the directory `dir`.
    ///
    /// # Errors
    /// `TooLong` above [`NAME_MAX`] bytes; `Invalid` for "", ".", "..", or
    /// a name with `/` or NUL.
    pub fn encrypt_name(&self, dir: &DirId, name: &OsStr) -> Result<Backing, NameError> {
        let b = name.as_bytes();
        if b.len() > NAME_MAX {
            return Err(NameError::TooLong);
        }
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
            return Err(NameError::Invalid);
        }
        let sealed = siv(&self.names)
            .encrypt([dir.as_slice()], b)
            .map_err(|_| NameError::Invalid)?;
        let short = b64(&sealed);
        if short.len() <= self.backing_max {
            return Ok(Backing::Short(short.into()));
        }
        let entry = long_entry(&short);
        Ok(Backing::Long {
            part: part_of(OsStr::new(&entry)),
            entry: entry.into(),
            content: short,
        })
    }

    /// The plaintext of a short-form string in the directory `dir`.
    ///
    /// # Errors
    /// `Auth` when it is not base64url or does not authenticate under `dir`.
    pub fn decrypt_name(&self, dir: &DirId, short: &[u8]) -> Result<OsString, NameError> {
        let sealed = unb64(short)?;
        let plain = siv(&self.names)
            .decrypt([dir.as_slice()], &sealed)
            .map_err(|_| NameError::Auth)?;
        let dots = plain == b"." || plain == b"..";
        if plain.is_empty() || dots || plain.len() > NAME_MAX || plain.contains(&b'/') || plain.contains(&0) {
            return Err(NameError::Auth);
        }
        Ok(OsString::from_vec(plain))
    }

    /// The plaintext of a long entry whose hash is `hash`, from its part's
    /// contents `content`.
    ///
    /// # Errors
    /// `Auth` when `content` is not the part of this entry or fails to
    /// decrypt under `dir`.
    pub fn decrypt_long(&self, dir: &DirId, hash: &[u8], content: &[u8]) -> Result<OsString, NameError> {
        let expect = b64(&Sha256::digest(content));
        // A part holding a name short enough for the short form was not made
        // by the mount: it would show a name twice (once per form).
        if expect.as_bytes() != hash || content.len() <= self.backing_max {
            return Err(NameError::Auth);
        }
        self.decrypt_name(dir, content)
    }

    /// The backing target of a symlink to `target`.
    ///
    /// # Errors
    /// `TooLong` above [`TARGET_MAX`] bytes.
    pub fn encrypt_target(&self, target: &[u8]) -> Result<Vec<u8>, NameError> {
        if target.len() > TARGET_MAX {
            return Err(NameError::TooLong);
        }
        let n = nonce();
        let sealed = siv(&self.symlinks)
            .encrypt([n.as_slice()], target)
            .map_err(|_| NameError::Invalid)?;
        let mut all = n.to_vec();
        all.extend_from_slice(&sealed);
        Ok(b64(&all).into_bytes())
    }

    /// The plaintext target of a backing symlink target.
    ///
    /// # Errors
    /// `Auth` when it does not authenticate.
    pub fn decrypt_target(&self, backing: &[u8]) -> Result<Vec<u8>, NameError> {
        let all = unb64(backing)?;
        if all.len() < OVERHEAD {
            return Err(NameError::Auth);
        }
        let (n, sealed) = all.split_at(NONCE_LEN);
        siv(&self.symlinks).decrypt([n], sealed).map_err(|_| NameError::Auth)
    }

    /// The backing name of the xattr `name` (`user.` + ciphertext); other
    /// namespaces are passed through for the caller to refuse.
    ///
    /// # Errors
    /// `TooLong` when the name after `user.` exceeds [`XATTR_NAME_MAX`].
    pub fn encrypt_xattr_name(&self, name: &OsStr) -> Result<OsString, NameError> {
        let Some(rest) = name.as_bytes().strip_prefix(USER) else {
            return Ok(name.to_os_string());
        };
        if rest.len() > XATTR_NAME_MAX {
            return Err(NameError::TooLong);
        }
        let sealed = siv(&self.xattrs)
            .encrypt([b"name".as_slice()], rest)
            .map_err(|_| NameError::Invalid)?;
        let mut out = USER.to_vec();
        out.extend_from_slice(b64(&sealed).as_bytes());
        Ok(OsString::from_vec(out))
    }

    /// The plaintext of a backing `user.` xattr name.
    ///
    /// # Errors
    /// `Auth` when it does not authenticate.
    pub fn decrypt_xattr_name(&self, backing: &[u8]) -> Result<Vec<u8>, NameError> {
        let rest = backing.strip_prefix(USER).ok_or(NameError::Auth)?;
        let plain = siv(&self.xattrs)
            .decrypt([b"name".as_slice()], &unb64(rest)?)
            .map_err(|_| NameError::Auth)?;
        let mut out = USER.to_vec();
        out.extend_from_slice(&plain);
        Ok(out)
    }

    /// The backing value of the xattr whose backing name is `name`.
    ///
    /// # Errors
    /// `TooLong` above [`XATTR_VALUE_MAX`] bytes.
    pub fn seal_xattr_value(&self, name: &OsStr, value: &[u8]) -> Result<Vec<u8>, NameError> {
        if value.len() > XATTR_VALUE_MAX {
            return Err(NameError::TooLong);
        }
        let n = nonce();
        let ad = [b"value".as_slice(), name.as_bytes(), n.as_slice()];
        let sealed = siv(&self.xattrs).encrypt(ad, value).map_err(|_| NameError::Invalid)?;
        let mut all = n.to_vec();
        all.extend_from_slice(&sealed);
        Ok(all)
    }

    /// The plaintext of the backing value of the xattr `name`.
    ///
    /// # Errors
    /// `Auth` when it does not authenticate (altered, or moved from
    /// another name).
    pub fn open_xattr_value(&self, name: &OsStr, backing: &[u8]) -> Result<Vec<u8>, NameError> {
        if backing.len() < OVERHEAD {
            return Err(NameError::Auth);
        }
        let (n, sealed) = backing.split_at(NONCE_LEN);
        let ad = [b"value".as_slice(), name.as_bytes(), n];
        siv(&self.xattrs).decrypt(ad, sealed).map_err(|_| NameError::Auth)
    }
}

/// The plaintext length of a symlink whose backing target is `len` bytes.
pub fn target_plain_len(len: u64) -> u64 {
    (len * 3 / 4).saturating_sub(OVERHEAD as u64)
}

/// The encryption context of the name key's blob.
pub fn names_context(root_id: &DirId) -> Context {
    let hex: String = root_id.iter().map(|b| format!("{b:02x}")).collect();
    [
        (NAMES_CONTEXT_KEY.to_string(), hex),
        (FORMAT_CONTEXT_KEY.to_string(), "2".to_string()),
    ]
    .into()
}

/// Why the root file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("backing directory I/O")]
    Io(#[from] std::io::Error),
    #[error("{ROOT_FILE} is damaged")]
    Damaged(#[source] crate::format::FormatError),
    #[error("name key unavailable")]
    Key(#[source] KeyError),
    #[error(
        "the backing filesystem allows names of at most {0} bytes; encrypted names need at least \
         {BACKING_NAME_MIN} (a new mount there needs names = \"plain\"; an encrypted one must be copied to a \
         filesystem with longer names)"
    )]
    NameMax(u64),
}

impl From<nix::Error> for RootError {
    fn from(e: nix::Error) -> Self {
        RootError::Io(e.into())
    }
}

fn resolve_beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens the regular file `name` right inside `dir` for reading, never
/// following a symlink or leaving `dir`; `ENOENT` if absent, `EIO` if
/// not a regular file.
pub fn open_regular_in(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = match openat2(dir, name, OpenHow::new().flags(flags).resolve(resolve_beneath())) {
        Err(nix::Error::ENOSYS) => openat(dir, name, flags, Mode::empty())?,
        Err(nix::Error::ELOOP) => return Err(nix::Error::EIO),
        fd => fd?,
    };
    let st = fstat(&fd)?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err(nix::Error::EIO);
    }
    Ok(File::from(fd))
}

/// Reads at most `max` bytes of the regular file `name` in `dir`.
///
/// # Errors
/// As [`open_regular_in`]; `EIO` if it is longer than `max`.
pub fn read_small(dir: BorrowedFd<'_>, name: &OsStr, max: usize) -> nix::Result<Vec<u8>> {
    let file = open_regular_in(dir, name)?;
    let mut out = Vec::with_capacity(max + 1);
    file.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    if out.len() > max {
        return Err(nix::Error::EIO);
    }
    Ok(out)
}

/// A random suffix for temporary names.
fn random_suffix() -> String {
    let mut r = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut r);
    b64(&r)
}

/// Writes `bytes` as the file `name` in `dir` atomically: a temporary file
/// (`prefix<random>`) is written and fsynced, then renamed onto `name`,
/// replacing it unless `noreplace`. A kill leaves `name` absent, or as it
/// was, or complete; never torn.
///
/// # Errors
/// I/O errors; `EEXIST` with `noreplace` when `name` exists.
/// `point` names the fault point between the fsync and the rename
/// (see [`crate::fault`]).
pub fn write_atomic(
    dir: BorrowedFd<'_>,
    prefix: &str,
    name: &OsStr,
    bytes: &[u8],
    noreplace: bool,
    point: &str,
) -> nix::Result<()> {
    let tmp = format!("{prefix}{}", random_suffix());
    let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = File::from(openat(dir, tmp.as_str(), flags, Mode::from_bits_truncate(0o600))?);
    let io = |e: std::io::Error| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let written = file.write_all_at(bytes, 0).and_then(|()| file.sync_data()).map_err(io);
    let flags = if noreplace {
        RenameFlags::RENAME_NOREPLACE
    } else {
        RenameFlags::empty()
    };
    let result = written
        .and_then(|()| fault::point(point))
        .and_then(|()| renameat2(dir, tmp.as_str(), dir, name, flags));
    if result.is_err() {
        let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    result
}

/// The id of the directory `dir` (not the root), from its `kmsd.dirid`.
///
/// # Errors
/// `ENOENT` when it has none; `EIO` when it is not exactly 16 bytes.
pub fn read_dir_id(dir: BorrowedFd<'_>) -> nix::Result<DirId> {
    let bytes = read_small(dir, OsStr::new(DIR_ID_FILE), DIR_ID_LEN)?;
    bytes.try_into().map_err(|_| nix::Error::EIO)
}

/// Gives the directory `dir` a new random id; if another id got there
/// first (`EEXIST`), returns that one.
///
/// # Errors
/// I/O errors.
pub fn write_dir_id(dir: BorrowedFd<'_>) -> nix::Result<DirId> {
    let mut id = [0u8; DIR_ID_LEN];
    rand::rngs::OsRng.fill_bytes(&mut id);
    match write_atomic(
        dir,
        DIR_ID_TMP,
        OsStr::new(DIR_ID_FILE),
        &id,
        true,
        "dirid.before-rename",
    ) {
        Ok(()) => Ok(id),
        Err(nix::Error::EEXIST) => read_dir_id(dir),
        Err(e) => Err(e),
    }
}

/// Whether `name` is one of the mount's own bookkeeping files that may be
/// removed with an empty directory: the id, temporary files, long-name
/// parts whose entry is absent from `present`.
pub fn removable(name: &OsStr, present: &dyn Fn(&OsStr) -> bool) -> bool {
    let b = name.as_bytes();
    if b == DIR_ID_FILE.as_bytes() || b.starts_with(DIR_ID_TMP.as_bytes()) || b.starts_with(b"kmsd.L.tmp.") {
        return true;
    }
    match b.strip_suffix(LONG_SUFFIX.as_bytes()) {
        Some(entry) => {
            matches!(classify(OsStr::from_bytes(entry)), Kind::Long(_)) && !present(OsStr::from_bytes(entry))
        }
        None => false,
    }
}

/// The mount's root file: loads it, or creates it in an empty `root`.
/// Returns `None` for a plain directory (no root file, and not empty or
/// `create` is false).
///
/// # Errors
/// I/O errors, a damaged root file, or a name key that does not unwrap.
pub fn open_root(root: &OwnedFd, keys: &dyn KeySource, create: bool) -> Result<Option<NameKeys>, RootError> {
    let limit = || {
        let namemax = nix::sys::statvfs::fstatvfs(root)?.name_max();
        backing_limit(namemax).ok_or(RootError::NameMax(namemax))
    };
    match read_small(root.as_fd(), OsStr::new(ROOT_FILE), HEADER_LEN) {
        Ok(bytes) => return Ok(Some(load_root(&bytes, keys)?.with_backing_max(limit()?))),
        Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    if !create || !looks_empty(root)? {
        return Ok(None);
    }
    let backing_max = limit()?;
    let mut root_id = [0u8; DIR_ID_LEN];
    rand::rngs::OsRng.fill_bytes(&mut root_id);
    let (master, blob) = keys.new_dek(&names_context(&root_id)).map_err(RootError::Key)?;
    let header = Header::new(root_id, blob).map_err(RootError::Damaged)?;
    let file = OsStr::new(ROOT_FILE);
    match write_atomic(
        root.as_fd(),
        ROOT_TMP,
        file,
        &header.encode(),
        true,
        "root.before-rename",
    ) {
        Ok(()) => {}
        // Another process made it meanwhile: use theirs.
        Err(nix::Error::EEXIST) => return open_root(root, keys, false),
        Err(e) => return Err(e.into()),
    }
    // The name is made durable before any name is written under the key:
    // a power cut must not keep files named under a key it loses.
    fault::point("root.before-dir-fsync")?;
    sync_dir(root)?;
    tracing::info!("new backing directory: names are encrypted");
    Ok(Some(NameKeys::derive(&master, &root_id).with_backing_max(backing_max)))
}

/// `fsync` of the directory `dir` (an `O_PATH` descriptor).
fn sync_dir(dir: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = openat(dir, ".", flags, Mode::empty())?;
    nix::unistd::fsync(&fd)
}

fn load_root(bytes: &[u8], keys: &dyn KeySource) -> Result<NameKeys, RootError> {
    let header = Header::decode(bytes).map_err(RootError::Damaged)?;
    let (_, slot) = header.current().map_err(RootError::Damaged)?;
    let master = keys
        .unwrap_dek(&names_context(&header.file_id), &slot.blob)
        .map_err(RootError::Key)?;
    Ok(NameKeys::derive(&master, &header.file_id))
}

/// The backing path of `rel` (a plaintext path relative to the mount's
/// root) under the backing directory `root`, walked component by
/// component without following symlinks; for operators and tests ("which
/// backing file is this?"). A plain directory maps names to themselves.
///
/// # Errors
/// As [`open_root`]; a component that is missing (`ENOENT`), not a
/// directory, or whose directory has no valid id.
pub fn backing_path(
    root: &std::path::Path,
    keys: &dyn KeySource,
    rel: &std::path::Path,
) -> Result<std::path::PathBuf, RootError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root_fd = nix::fcntl::open(root, flags, Mode::empty())?;
    let Some(names) = open_root(&root_fd, keys, false)? else {
        return Ok(root.join(rel));
    };
    let (mut dir, mut id, mut out) = (root_fd, names.root_id, root.to_path_buf());
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let b = names
            .encrypt_name(&id, part.as_os_str())
            .map_err(|e| RootError::Io(nix::Error::from(e).into()))?;
        out.push(b.entry());
        if i + 1 < parts.len() {
            let how = OpenHow::new().flags(flags).resolve(resolve_beneath());
            dir = openat2(dir.as_fd(), b.entry(), how)?;
            id = read_dir_id(dir.as_fd())?;
        }
    }
    Ok(out)
}

/// Empty but for leftovers of an interrupted root-file creation.
fn looks_empty(root: &OwnedFd) -> std::io::Result<bool> {
    let path = format!("/proc/self/fd/{}", root.as_raw_fd());
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(ROOT_TMP.as_bytes()) || name == crate::journal::JOURNAL_FILE {
            continue;
        }
        // The root of a freshly made filesystem: mkfs's empty lost+found.
        let empty_lost_found =
            name == "lost+found" && entry.file_type()?.is_dir() && std::fs::read_dir(entry.path())?.next().is_none();
        if !empty_lost_found {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MemoryKeySource;

    fn keys() -> NameKeys {
        NameKeys::derive(&Dek::from_bytes([7; 32]), &[1; 16])
    }

    #[test]
    fn names_round_trip_deterministic_and_bound_to_their_directory() {
        let k = keys();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let n = OsStr::new("salaries-2026.xlsx");
        let e = k.encrypt_name(&a, n).unwrap();
        assert_eq!(e, k.encrypt_name(&a, n).unwrap(), "deterministic");
        assert_ne!(e, k.encrypt_name(&b, n).unwrap());
        let Backing::Short(s) = &e else { panic!("short") };
        assert!(!s.as_bytes().contains(&b'.') && !s.as_bytes().contains(&b'/'));
        assert_eq!(k.decrypt_name(&a, s.as_bytes()).unwrap(), n);
        assert_eq!(k.decrypt_name(&b, s.as_bytes()), Err(NameError::Auth));
        let mut bad = s.as_bytes().to_vec();
        bad[3] = if bad[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.decrypt_name(&a, &bad), Err(NameError::Auth));
        // "." and ".." never come out of a backing name, even if sealed.
        for dots in [&b"."[..], b".."] {
            let sealed = b64(&siv(&k.names).encrypt([a.as_slice()], dots).unwrap());
            assert_eq!(k.decrypt_name(&a, sealed.as_bytes()), Err(NameError::Auth));
        }
        assert_eq!(classify(s), Kind::Short(s.as_bytes()));
    }

    #[test]
    fn lengths_short_up_to_175_long_up_to_255_then_too_long() {
        let k = keys();
        let d = [3u8; 16];
        let name = |n: usize| OsString::from("x".repeat(n));
        assert!(matches!(k.encrypt_name(&d, &name(SHORT_MAX)).unwrap(), Backing::Short(s) if s.len() == 255));
        // A long entry whose part holds a short form is refused: it would
        // list a name twice.
        let Backing::Short(short) = k.encrypt_name(&d, &name(SHORT_MAX)).unwrap() else {
            unreachable!()
        };
        let hash = b64(&Sha256::digest(short.as_bytes()));
        assert!(k.decrypt_long(&d, hash.as_bytes(), short.as_bytes()).is_err());
        let long = k.encrypt_name(&d, &name(SHORT_MAX + 1)).unwrap();
        let Backing::Long { entry, part, content } = &long else {
            panic!("long")
        };
        assert_eq!(entry.len(), 50);
        assert_eq!(part, &part_of(entry));
        let Kind::Long(hash) = classify(entry) else {
            panic!("kind")
        };
        assert_eq!(k.decrypt_long(&d, hash, content.as_bytes()).unwrap(), name(176));
        assert_eq!(classify(part), Kind::Reserved);
        let other = k.encrypt_name(&d, &name(200)).unwrap();
        let Backing::Long { content: c2, .. } = other else {
            panic!()
        };
        assert_eq!(
            k.decrypt_long(&d, hash, c2.as_bytes()),
            Err(NameError::Auth),
            "swapped part"
        );
        let unicode: String = "é".repeat(127) + "x"; // 255 bytes
        assert!(matches!(
            k.encrypt_name(&d, OsStr::new(&unicode)),
            Ok(Backing::Long { .. })
        ));
        assert_eq!(k.encrypt_name(&d, &name(256)), Err(NameError::TooLong));
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(k.encrypt_name(&d, OsStr::new(bad)), Err(NameError::Invalid));
        }
    }

    #[test]
    fn the_short_form_threshold_follows_the_backing_name_limit() {
        assert_eq!(BACKING_NAME_MIN, 55);
        for (namemax, want) in [
            (0, None),
            (14, None),
            (54, None),
            (55, Some(55)),
            (100, Some(100)),
            (143, Some(143)),
            (255, Some(255)),
            (1024, Some(255)),
            (u64::MAX, Some(255)),
        ] {
            assert_eq!(backing_limit(namemax), want, "f_namemax {namemax}");
        }
        assert_eq!(short_max(255), SHORT_MAX);
        assert_eq!(short_max(55), 25);
        assert_eq!(short_max(143), 91);
        let d = [4u8; 16];
        for namemax in [55u64, 100, 143, 200, 255] {
            let limit = backing_limit(namemax).unwrap();
            let k = keys().with_backing_max(limit);
            let short = k.short_max();
            let name = |n: usize| OsString::from("y".repeat(n));
            // The longest short form fits the limit, one byte more is long,
            // and the long form's names fit too.
            let Backing::Short(s) = k.encrypt_name(&d, &name(short)).unwrap() else {
                panic!("{namemax}: {short} bytes should be short")
            };
            assert!(s.len() <= limit && s.len() + 2 > limit, "{namemax}: {}", s.len());
            for n in [short + 1, NAME_MAX] {
                let b = k.encrypt_name(&d, &name(n)).unwrap();
                let Backing::Long { entry, part, content } = &b else {
                    panic!("{namemax}: {n} bytes should be long")
                };
                assert!(part.len() <= limit && entry.len() < part.len());
                let Kind::Long(hash) = classify(entry) else { panic!() };
                assert_eq!(k.decrypt_long(&d, hash, content.as_bytes()).unwrap(), name(n));
            }
            // Under the 255-byte limit, a long part of a name this limit
            // makes long holds a form that would be short there: refused.
            let Backing::Long { entry, content, .. } = k.encrypt_name(&d, &name(short + 1)).unwrap() else {
                unreachable!()
            };
            let Kind::Long(hash) = classify(&entry) else { panic!() };
            let wide = keys();
            assert_eq!(
                wide.decrypt_long(&d, hash, content.as_bytes()).is_err(),
                content.len() <= BACKING_NAME_MAX
            );
        }
    }

    #[test]
    fn targets_and_xattrs_round_trip_and_fail_when_altered() {
        let k = keys();
        let t = k.encrypt_target(b"/home/alice/secret").unwrap();
        assert_ne!(t, k.encrypt_target(b"/home/alice/secret").unwrap(), "random nonce");
        assert_eq!(target_plain_len(t.len() as u64), 18);
        assert_eq!(k.decrypt_target(&t).unwrap(), b"/home/alice/secret");
        let max = k.encrypt_target(&[b'a'; TARGET_MAX]).unwrap();
        assert!(max.len() <= 4095);
        assert_eq!(target_plain_len(max.len() as u64), TARGET_MAX as u64);
        assert_eq!(k.encrypt_target(&[b'a'; TARGET_MAX + 1]), Err(NameError::TooLong));
        let mut bad = t.clone();
        bad[5] ^= 1;
        assert!(k.decrypt_target(&bad).is_err());

        let n = k.encrypt_xattr_name(OsStr::new("user.comment")).unwrap();
        assert!(n.as_bytes().starts_with(b"user.") && n.len() <= 255);
        assert_eq!(k.decrypt_xattr_name(n.as_bytes()).unwrap(), b"user.comment");
        let long = format!("user.{}", "n".repeat(XATTR_NAME_MAX));
        assert!(k.encrypt_xattr_name(OsStr::new(&long)).unwrap().len() <= 255);
        assert_eq!(
            k.encrypt_xattr_name(OsStr::new(&format!("{long}n"))),
            Err(NameError::TooLong)
        );
        assert_eq!(k.encrypt_xattr_name(OsStr::new("trusted.x")).unwrap(), "trusted.x");
        let v = k.seal_xattr_value(&n, b"value").unwrap();
        assert_eq!(v.len(), 5 + OVERHEAD);
        assert_eq!(k.open_xattr_value(&n, &v).unwrap(), b"value");
        let other = k.encrypt_xattr_name(OsStr::new("user.other")).unwrap();
        assert!(k.open_xattr_value(&other, &v).is_err(), "moved to another name");
    }

    #[test]
    fn subkeys_differ_by_purpose_and_root() {
        let master = Dek::from_bytes([9; 32]);
        let a = NameKeys::derive(&master, &[1; 16]);
        let b = NameKeys::derive(&master, &[2; 16]);
        assert_ne!(*a.names, *a.symlinks);
        assert_ne!(*a.names, *a.xattrs);
        assert_ne!(*a.names, *b.names);
        assert_eq!(format!("{a:?}"), "NameKeys([redacted])");
    }

    fn dir_fd(p: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(p, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn root_file_is_made_in_an_empty_dir_only_and_reloads() {
        let src = MemoryKeySource::default();
        let dir = tempfile::tempdir().unwrap();
        let fd = dir_fd(dir.path());
        assert!(open_root(&fd, &src, false).unwrap().is_none(), "plain when asked");
        let made = open_root(&fd, &src, true).unwrap().unwrap();
        let again = open_root(&fd, &src, true).unwrap().unwrap();
        assert_eq!(*made.names, *again.names);
        assert_eq!(std::fs::metadata(dir.path().join(ROOT_FILE)).unwrap().len(), 512);
        let other = MemoryKeySource::default();
        assert!(matches!(open_root(&fd, &other, true), Err(RootError::Key(_))));
        let full = tempfile::tempdir().unwrap();
        std::fs::write(full.path().join("old"), b"").unwrap();
        assert!(open_root(&dir_fd(full.path()), &src, true).unwrap().is_none());
    }

    #[test]
    fn dir_id_is_atomic_and_first_writer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let fd = dir_fd(dir.path());
        assert_eq!(read_dir_id(fd.as_fd()), Err(nix::Error::ENOENT));
        let id = write_dir_id(fd.as_fd()).unwrap();
        assert_eq!(read_dir_id(fd.as_fd()).unwrap(), id);
        assert_eq!(write_dir_id(fd.as_fd()).unwrap(), id, "existing id kept");
        std::fs::write(dir.path().join(DIR_ID_FILE), b"short").unwrap();
        assert_eq!(read_dir_id(fd.as_fd()), Err(nix::Error::EIO));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left");
    }

    #[test]
    fn removable_covers_bookkeeping_only() {
        let present = |n: &OsStr| n == "kmsd.L.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(removable(OsStr::new(DIR_ID_FILE), &present));
        assert!(removable(OsStr::new("kmsd.dirid.tmp.xyz"), &present));
        assert!(removable(
            OsStr::new("kmsd.L.BAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.name"),
            &present
        ));
        assert!(!removable(
            OsStr::new("kmsd.L.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.name"),
            &present
        ));
        assert!(!removable(OsStr::new("abc"), &present));
        assert!(!removable(OsStr::new("other.txt"), &present));
    }
}
