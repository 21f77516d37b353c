use std::fmt;

/// Domain separation: the same bytes hashed by another part of the system give another hash.
const CONTEXT: &str = "veraltheim 2025 content hash v1";

/// A stable 256-bit content hash (BLAKE3), e.g. the cache key of a request.
///
/// Stable across processes, machines and releases: the same parts always give the same hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of one byte string.
    pub fn of(bytes: &[u8]) -> Self {
        ContentHasher::new().part(bytes).finish()
    }

    /// The hash of several byte strings, each framed by its length so that `["ab", "c"]` and
    /// `["a", "bc"]` differ.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        parts
            .into_iter()
            .fold(ContentHasher::new(), |hasher, part| hasher.part(part))
            .finish()
    }

    /// From raw bytes (e.g. read back from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 128 bits, for places that want a shorter key.
    pub fn short(&self) -> u128 {
        let mut head = [0u8; 16];
        head.copy_from_slice(&self.0[..16]);
        u128::from_be_bytes(head)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

/// Builds a [`ContentHash`] from parts fed one at a time.
#[derive(Clone)]
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    /// An empty hasher.
    pub fn new() -> Self {
        Self(blake3::Hasher::new_derive_key(CONTEXT))
    }

    /// Adds one part, framed by its length.
    pub fn part(mut self, bytes: &[u8]) -> Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// The hash of the parts so far.
    pub fn finish(&self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentHasher")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_across_releases() {
        // Pinned: a change here invalidates every persisted cache key.
        assert_eq!(ContentHash::of(b"hello").to_string(), PINNED_HELLO);
    }

    const PINNED_HELLO: &str = "a2da8f9745a2c4628152209824b45d9e838e83d5cbf9def8c562162517024c5e";

    #[test]
    fn parts_are_framed() {
        let ab_c = ContentHash::of_parts([b"ab".as_slice(), b"c"]);
        let a_bc = ContentHash::of_parts([b"a".as_slice(), b"bc"]);
        assert_ne!(ab_c, a_bc);
        assert_ne!(ContentHash::of(b"abc"), ab_c);
        assert_eq!(ab_c, ContentHasher::new().part(b"ab").part(b"c").finish());
        assert_eq!(ContentHash::of(b"x"), ContentHash::of(b"x"));
        assert_ne!(ContentHash::of(b"x"), ContentHash::of(b"y"));
    }

    #[test]
    fn short_form_is_the_leading_bytes() {
        let hash = ContentHash::from_bytes([0xab; 32]);
        assert_eq!(hash.short(), u128::from_be_bytes([0xab; 16]));
        assert_eq!(hash.to_string(), "ab".repeat(32));
    }
}
