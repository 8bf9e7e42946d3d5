//! Addresses and numbers written as `Display` writes them, without `core::fmt`: on every
//! request (`X-Forwarded-For`, the access log's line) its machinery costs more than the
//! rest of the field.

use std::{io::Write as _, net::IpAddr};

/// Writes `ip` as `Display` does; an IPv4 address digit by digit (an IPv6 one, rarer,
/// through the formatter).
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    // Made on the stack and copied once: a push per digit checked the room each time.
    let mut text = [b'.'; 15];
    let mut n = 0;
    for octet in v4.octets() {
        if octet >= 100 {
            text[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            text[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + octet % 10;
        // Past the last octet this skips the dot the text ends before.
        n += 2;
    }
    out.extend_from_slice(&text[..n - 1]);
}

/// Writes `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_numbers_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = Vec::new();
            push_ip(&mut s, ip);
            assert_eq!(String::from_utf8(s).unwrap(), ip.to_string());
        }
        for n in [0, 7, 10, 999, 1_000, u64::MAX] {
            let mut s = Vec::new();
            push_u64(&mut s, n);
            assert_eq!(String::from_utf8(s).unwrap(), n.to_string());
        }
    }
}
