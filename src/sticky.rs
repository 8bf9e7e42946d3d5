//! The server id a sticky cookie carries: opaque (it does not show the server's address),
//! and the same on every worker and every instance, so a client stays on its server whichever
//! worker or instance takes its next request.
//!
//! As HAProxy's `cookie SRV insert` and Traefik's sticky cookie do, the cookie names a server,
//! not a request; unlike HAProxy's, the name is not configured but derived: 16 lowercase hex
//! digits of XXH3-64 (fixed seed) over the pool's name, a NUL and the server's URL. The id
//! must not change between versions either: a client keeps its cookie across an upgrade.
//!
//! Opaque is not secret: whoever can list candidate pools and URLs can hash them and find
//! which one an id names. A forged id of a real server only picks that server, as a client
//! may; anything that is not an id is turned away by [`ServerId::parse`] without a lookup.

use std::fmt;

use xxhash_rust::xxh3::Xxh3;

/// Seed of the id's hash: part of the id's definition (a new seed would unstick every client).
const ID_SEED: u64 = 0x5ee_d1d;

/// A server of a pool, as a sticky cookie names it. Its [`Display`](fmt::Display) form is the
/// cookie's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ServerId(u64);

impl ServerId {
    /// The id of the server at `url` (in the same form on every instance, e.g. `Url::as_str`)
    /// in `pool`. The NUL keeps ("ab", "c") and ("a", "bc") apart: neither a pool's name nor
    /// a URL holds one.
    pub(crate) fn of(pool: &str, url: &str) -> Self {
        let mut hasher = Xxh3::with_seed(ID_SEED);
        hasher.update(pool.as_bytes());
        hasher.update(&[0]);
        hasher.update(url.as_bytes());
        Self(hasher.digest())
    }

    /// Reads a cookie's value: exactly the 16 lowercase hex digits [`ServerId::of`] writes,
    /// or `None`.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        // from_str_radix alone would also take a sign, upper case and fewer digits.
        if value.len() != 16
            || !value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        u64::from_str_radix(value, 16).ok().map(Self)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_server_of_the_same_pool_always_has_the_same_id() {
        let id = ServerId::of("default", "http://127.0.0.1:5001/");
        assert_eq!(id, ServerId::of("default", "http://127.0.0.1:5001/"));
        // Clients keep their cookies across upgrades: the id must not change.
        assert_eq!(id.to_string(), "60ca26041868ff53");
    }

    #[test]
    fn different_servers_and_pools_have_different_ids() {
        let ids = [
            ServerId::of("default", "http://127.0.0.1:5001/"),
            ServerId::of("default", "http://127.0.0.1:5002/"),
            ServerId::of("api", "http://127.0.0.1:5001/"),
            ServerId::of("defaul", "thttp://127.0.0.1:5001/"),
            ServerId::of("", "http://127.0.0.1:5001/"),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn an_id_shows_nothing_of_the_address() {
        for (url, parts) in [
            (
                "http://10.1.2.3:8080/",
                ["10.1.2.3", "8080", "0a010203", "1f90"],
            ),
            (
                "http://192.168.7.21:5001/",
                ["192.168", "5001", "c0a80715", "1389"],
            ),
            (
                "https://[2001:db8::7]:443/",
                ["2001", "db8", "0443", "01bb"],
            ),
        ] {
            let id = ServerId::of("default", url).to_string();
            assert_eq!(id.len(), 16);
            for part in parts {
                assert!(!id.contains(part), "{id} shows {part} of {url}");
            }
        }
    }

    #[test]
    fn an_id_reads_back_and_anything_else_is_refused() {
        let id = ServerId::of("default", "http://127.0.0.1:5001/");
        assert_eq!(ServerId::parse(&id.to_string()), Some(id));
        assert_eq!(ServerId::parse("0000000000000000"), Some(ServerId(0)));
        // The real id cut, lengthened, capitalised, signed, spoiled or padded.
        for garbage in [
            "",
            "60ca26041868ff5",
            "60ca26041868ff530",
            "60CA26041868FF53",
            "+0ca26041868ff53",
            "60ca26041868ff5g",
            " 0ca26041868ff53",
            "60ca26041868ffé",
            "http://127.0.0.1",
        ] {
            assert_eq!(ServerId::parse(garbage), None, "{garbage:?}");
        }
    }
}
