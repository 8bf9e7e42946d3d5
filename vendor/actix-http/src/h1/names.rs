//! Header names as they came on the wire, remembered per thread (roundabout patch,
//! VENDORED.md).
//!
//! `HeaderName::from_bytes` lower-cases a name into a scratch buffer byte by byte, then looks
//! it up among the standard names, and allocates a name it does not know: ~100 instructions
//! for `Content-Type`. But a connection's peers send the same names, spelled the same way,
//! head after head (a browser's dozen request fields, a server's answer fields), so the
//! decoder asks this cache first: one hash of the raw bytes, one comparison, and a clone of
//! the name made the first time (a copy for a standard name, a reference count for another).

use std::cell::RefCell;

use http::header::{HeaderName, InvalidHeaderName};

/// Names longer than this are not remembered (few are; they are parsed every time).
const MAX_LEN: usize = 32;

/// Slots in the cache, direct-mapped: a name that hashes to a taken slot replaces it.
const SLOTS: usize = 64;

struct Slot {
    len: u8,
    /// The name's bytes as [`key`] packs them.
    key: [u64; 4],
    name: Option<HeaderName>,
}

thread_local! {
    static NAMES: RefCell<[Slot; SLOTS]> = const {
        RefCell::new([const { Slot { len: 0, key: [0; 4], name: None } }; SLOTS])
    };
}

/// The header name spelled `raw`, as [`HeaderName::from_bytes`] makes it.
pub(crate) fn header_name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if raw.is_empty() || raw.len() > MAX_LEN {
        return HeaderName::from_bytes(raw);
    }
    let key = key(raw);
    NAMES
        .try_with(|names| {
            let mut names = names.borrow_mut();
            let slot = &mut names[slot_of(&key, raw.len())];
            if usize::from(slot.len) == raw.len() && slot.key == key {
                if let Some(name) = &slot.name {
                    return Ok(name.clone());
                }
            }
            let name = HeaderName::from_bytes(raw)?;
            *slot = Slot {
                len: raw.len() as u8,
                key,
                name: Some(name.clone()),
            };
            Ok(name)
        })
        // the thread is ending
        .unwrap_or_else(|_| HeaderName::from_bytes(raw))
}

/// A name of 1 to [`MAX_LEN`] bytes packed in four words, from loads that overlap rather
/// than a loop: with the length, they hold every byte, so equal keys of equal lengths are
/// equal names.
#[inline]
fn key(raw: &[u8]) -> [u64; 4] {
    let len = raw.len();
    let at8 = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().unwrap());
    let at4 = |i: usize| u64::from(u32::from_le_bytes(raw[i..i + 4].try_into().unwrap()));
    match len {
        16.. => [at8(0), at8(8), at8(len - 16), at8(len - 8)],
        8.. => [at8(0), at8(len - 8), 0, 0],
        4.. => [at4(0) | at4(len - 4) << 32, 0, 0, 0],
        _ => [
            u64::from(raw[0]) | u64::from(raw[len / 2]) << 8 | u64::from(raw[len - 1]) << 16,
            0,
            0,
            0,
        ],
    }
}

/// The slot of a name: its key's first and last words and its length, mixed.
#[inline]
fn slot_of(key: &[u64; 4], len: usize) -> usize {
    let mixed = (key[0] ^ key[3].rotate_left(29) ^ key[1].rotate_left(13) ^ len as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - SLOTS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_name_is_the_one_from_bytes_makes() {
        let spellings: &[&[u8]] = &[
            b"Host",
            b"host",
            b"HOST",
            b"Content-Type",
            b"content-type",
            b"X-Request-Id",
            b"x-request-id",
            b"Sec-Fetch-Mode",
            b"sec-fetch-site",
            b"a",
            b"Z",
            b"x-a-name-of-exactly-32-bytes-xxx",
            b"x-a-name-longer-than-thirty-two-bytes",
            b"Accept",
            b"Accept-Encoding",
            b"Accept-Language",
        ];
        // Three rounds: the first fills the cache, the others read it (and collisions
        // replace slots, which must not change any answer).
        for _ in 0..3 {
            for raw in spellings {
                let expected = HeaderName::from_bytes(raw).unwrap();
                let got = header_name(raw).unwrap();
                assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(raw));
                assert_eq!(got.as_str(), expected.as_str());
            }
        }
    }

    #[test]
    fn names_that_share_a_slot_are_still_told_apart() {
        // Many names of one length: some share slots, and each must come back as itself.
        let raws: Vec<String> = (0..500).map(|i| format!("x-field-{i:04}")).collect();
        for _ in 0..2 {
            for raw in &raws {
                assert_eq!(header_name(raw.as_bytes()).unwrap().as_str(), raw);
            }
        }
    }

    #[test]
    fn names_of_every_length_that_differ_in_one_byte_are_told_apart() {
        for len in 1..=MAX_LEN {
            for at in 0..len {
                let mut a = vec![b'a'; len];
                let mut b = a.clone();
                b[at] = b'b';
                assert_ne!(key(&a), key(&b), "length {len}, byte {at}");
                for raw in [&mut a, &mut b] {
                    let name = header_name(raw).unwrap();
                    assert_eq!(name.as_str().as_bytes(), &raw[..]);
                }
            }
        }
    }

    #[test]
    fn an_invalid_name_is_refused_and_not_remembered() {
        assert!(header_name(b"bad name").is_err());
        assert!(header_name(b"bad name").is_err());
        assert!(header_name(b"").is_err());
        assert!(header_name(&[b'x'; 40]).is_ok());
    }
}
