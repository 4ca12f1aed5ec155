//! [`Secret`]: the type of every plaintext and data key the protocol
//! carries.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Bytes that must not leak: a plaintext or a data key. They live in
/// zeroizing memory (wiped when dropped), print as `[redacted]` with their
/// length, and go on the wire exactly as a `Vec<u8>` would (the wire format
/// does not change).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes ownership of `bytes` (no copy).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes, still wiped when dropped.
    pub fn into_zeroizing(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl Deref for Secret {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl From<&[u8]> for Secret {
    /// Copies `bytes` into zeroizing memory.
    fn from(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }
}

impl From<Zeroizing<Vec<u8>>> for Secret {
    fn from(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted; {} bytes]", self.0.len())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As `Vec<u8>` does, so the encoding stays the same.
        self.0.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<u8>::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_exactly_as_a_vec_of_bytes() {
        let bytes = vec![0, 1, 200, 255, 7];
        let secret = Secret::new(bytes.clone());
        assert_eq!(
            postcard::to_allocvec(&secret).unwrap(),
            postcard::to_allocvec(&bytes).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&secret).unwrap(),
            serde_json::to_string(&bytes).unwrap()
        );
        let back: Secret = postcard::from_bytes(&postcard::to_allocvec(&bytes).unwrap()).unwrap();
        assert_eq!(&back[..], &bytes[..]);
    }

    #[test]
    fn debug_shows_only_the_length() {
        let text = format!("{:?}", Secret::new(vec![0x5a; 3]));
        assert_eq!(text, "[redacted; 3 bytes]");
    }
}
