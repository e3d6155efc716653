//! A cached entry, and its encoding as an L2 (Redis) value.
//!
//! The L2 encoding is a fixed 14-byte header followed by the value in `postcard`:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version (`1`) |
//! | 1 | kind: `0` a value, `1` a negative entry (the loader said "no such thing") |
//! | 2..10 | fresh until, milliseconds since the UNIX epoch, big-endian |
//! | 10..14 | how long the load took, milliseconds, big-endian (for early refresh) |
//!
//! The Lua scripts read the "fresh until" field to tell a fresh value from one kept
//! only for stale-if-error; a value whose header or body does not decode (written by
//! another version) is treated as a miss.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format version written in byte 0.
pub(crate) const FORMAT: u8 = 1;
const HEADER: usize = 14;
const KIND_VALUE: u8 = 0;
const KIND_NEGATIVE: u8 = 1;

/// One cached entry: a value or a confirmed absence, with its times.
///
/// Times are nanoseconds on the cache's clock (see [`palisade_core::Clock`]); the L2
/// encoding carries wall-clock milliseconds instead, so that processes agree.
#[derive(Clone, Debug)]
pub(crate) struct Entry<V> {
    /// `None` is a negative entry.
    pub value: Option<V>,
    /// Served without a load until this time.
    pub fresh_until: u64,
    /// Served when a load fails until this time (stale-if-error).
    pub stale_until: u64,
    /// Within this long of `fresh_until`, hits may start an early refresh (zero: never).
    pub refresh_window: u64,
    /// How long the load that produced it took (nanoseconds).
    pub load_nanos: u64,
}

impl<V> Entry<V> {
    /// Whether the entry may be served without a load at `now`.
    #[inline]
    pub fn is_fresh(&self, now: u64) -> bool {
        now < self.fresh_until
    }

    /// Whether the entry may be served when a load fails at `now`.
    #[inline]
    pub fn is_usable_stale(&self, now: u64) -> bool {
        now < self.stale_until
    }
}

/// An L2 value as read: the value and its wall-clock times.
#[derive(Debug)]
pub(crate) struct Decoded<V> {
    pub value: Option<V>,
    /// Milliseconds since the UNIX epoch.
    pub fresh_until_ms: u64,
    pub load_ms: u32,
}

/// Why an L2 value could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("the value is {0} bytes, shorter than the {HEADER}-byte header")]
    Short(usize),
    #[error("format version {0} is not {FORMAT}")]
    Version(u8),
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("the value does not decode: {0}")]
    Body(#[from] postcard::Error),
}

/// Encodes `value` (or a negative entry) for L2.
pub(crate) fn encode<V: Serialize>(
    value: Option<&V>,
    fresh_until: u64,
    load_ms: u32,
) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT);
    out.push(if value.is_some() {
        KIND_VALUE
    } else {
        KIND_NEGATIVE
    });
    out.extend_from_slice(&fresh_until.to_be_bytes());
    out.extend_from_slice(&load_ms.to_be_bytes());
    match value {
        Some(v) => postcard::to_extend(v, out),
        None => Ok(out),
    }
}

/// Decodes an L2 value.
pub(crate) fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<Decoded<V>, DecodeError> {
    if bytes.len() < HEADER {
        return Err(DecodeError::Short(bytes.len()));
    }
    if bytes[0] != FORMAT {
        return Err(DecodeError::Version(bytes[0]));
    }
    let fresh_until = u64::from_be_bytes(bytes[2..10].try_into().unwrap_or_default());
    let load_ms = u32::from_be_bytes(bytes[10..14].try_into().unwrap_or_default());
    let value = match bytes[1] {
        KIND_VALUE => Some(postcard::from_bytes(&bytes[HEADER..])?),
        KIND_NEGATIVE => None,
        other => return Err(DecodeError::Kind(other)),
    };
    Ok(Decoded {
        value,
        fresh_until_ms: fresh_until,
        load_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_value_and_negative() {
        let bytes = encode(Some(&("a".to_string(), 7u32)), 1_000, 12).unwrap();
        let e: Decoded<(String, u32)> = decode(&bytes).unwrap();
        assert_eq!(e.value, Some(("a".to_string(), 7)));
        assert_eq!((e.fresh_until_ms, e.load_ms), (1_000, 12));

        let bytes = encode::<u32>(None, 2_000, 0).unwrap();
        assert_eq!(bytes.len(), HEADER);
        let e: Decoded<u32> = decode(&bytes).unwrap();
        assert_eq!(e.value, None);
    }

    #[test]
    fn foreign_bytes_are_errors_not_panics() {
        assert!(matches!(decode::<u32>(b"short"), Err(DecodeError::Short(5))));
        let mut bytes = encode(Some(&5u32), 1, 1).unwrap();
        bytes[0] = 9;
        assert!(matches!(decode::<u32>(&bytes), Err(DecodeError::Version(9))));
        bytes[0] = FORMAT;
        bytes[1] = 7;
        assert!(matches!(decode::<u32>(&bytes), Err(DecodeError::Kind(7))));
        // A value of another type: a number where a string is expected.
        let bytes = encode(Some(&5u32), 1, 1).unwrap();
        assert!(matches!(decode::<String>(&bytes), Err(DecodeError::Body(_))));
    }
}
