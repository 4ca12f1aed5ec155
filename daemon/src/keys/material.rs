//! Key material: 32 secret bytes that zeroize on drop and never print.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of AES-256 key material.
pub const MATERIAL_LEN: usize = 32;

/// AES-256 key material. `Debug` prints `[redacted]`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
pub struct Material([u8; MATERIAL_LEN]);

impl Material {
    /// Fresh material from the OS-seeded CSPRNG.
    pub fn random() -> Self {
        let mut bytes = [0u8; MATERIAL_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Wraps existing bytes (e.g. received from a primary).
    pub fn from_bytes(bytes: [u8; MATERIAL_LEN]) -> Self {
        Self(bytes)
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8; MATERIAL_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Material([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let m = Material::from_bytes([0xab; 32]);
        let s = format!("{m:?}");
        assert_eq!(s, "Material([redacted])");
        assert!(!s.contains("171"));
    }

    #[test]
    fn random_material_differs() {
        assert_ne!(Material::random(), Material::random());
    }
}
