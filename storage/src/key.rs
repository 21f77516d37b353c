use std::borrow::Cow;

use crate::ContentHash;

/// A key type of a [`crate::Table`]: encoded to bytes whose byte order is the key's order, so
/// range scans come back in key order.
pub trait Key {
    /// What a scan gives back.
    type Owned;
    /// The ordered byte form.
    fn encode(&self) -> Cow<'_, [u8]>;
    /// Reads a key back from its byte form.
    fn decode(bytes: &[u8]) -> Result<Self::Owned, &'static str>;
    /// The key for error messages.
    fn describe(bytes: &[u8]) -> String {
        format!("{bytes:02x?}")
    }
}

/// UTF-8 bytes: byte order is code point order, as for `str`'s own `Ord`.
impl Key for str {
    type Owned = String;

    fn encode(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }

    fn decode(bytes: &[u8]) -> Result<String, &'static str> {
        String::from_utf8(bytes.to_vec()).map_err(|_| "the key is not UTF-8")
    }

    fn describe(bytes: &[u8]) -> String {
        format!("{:?}", String::from_utf8_lossy(bytes))
    }
}

impl Key for [u8] {
    type Owned = Vec<u8>;

    fn encode(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }

    fn decode(bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
        Ok(bytes.to_vec())
    }
}

/// Big-endian, so byte order is numeric order.
impl Key for u64 {
    type Owned = u64;

    fn encode(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.to_be_bytes().to_vec())
    }

    fn decode(bytes: &[u8]) -> Result<u64, &'static str> {
        let array: [u8; 8] = bytes.try_into().map_err(|_| "the key is not 8 bytes")?;
        Ok(u64::from_be_bytes(array))
    }

    fn describe(bytes: &[u8]) -> String {
        Self::decode(bytes).map_or_else(|_| format!("{bytes:02x?}"), |n| n.to_string())
    }
}

impl Key for ContentHash {
    type Owned = ContentHash;

    fn encode(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }

    fn decode(bytes: &[u8]) -> Result<ContentHash, &'static str> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| "the key is not 32 bytes")?;
        Ok(ContentHash::from_bytes(array))
    }

    fn describe(bytes: &[u8]) -> String {
        Self::decode(bytes).map_or_else(|_| format!("{bytes:02x?}"), |hash| hash.to_string())
    }
}
