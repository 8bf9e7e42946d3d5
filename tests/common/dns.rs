//! A DNS server of the test's own on a loopback UDP port, answering A and AAAA questions
//! from records the test changes while it runs (or failing on purpose), for servers known by
//! name. Just enough of RFC 1035 for a resolver's questions: one question, answers with a
//! TTL of 0, anything else answered with no record.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::Duration,
};

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the records.
    Answer,
    /// SERVFAIL to every question.
    Fail,
    /// Nothing at all (the resolver times out).
    Silent,
}

/// A DNS server on `127.0.0.1:port` (UDP); stops with the test process.
pub struct Dns {
    pub addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Dns {
    pub fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::default();
        let mode = Arc::new(Mutex::new(Mode::Answer));
        let (r, m) = (records.clone(), mode.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mode = *m.lock().unwrap();
                if mode == Mode::Silent {
                    continue;
                }
                if let Some(answer) = answer(&buf[..n], &r.lock().unwrap(), mode) {
                    let _ = socket.send_to(&answer, from);
                }
            }
        });
        Dns {
            addr,
            records,
            mode,
        }
    }

    /// `name` resolves to `ips` from now on (none: it has no address).
    pub fn set(&self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        self.records
            .lock()
            .unwrap()
            .insert(name.trim_end_matches('.').to_ascii_lowercase(), ips);
    }

    pub fn mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// The answer to the query `q`, if it is one.
fn answer(q: &[u8], records: &HashMap<String, Vec<IpAddr>>, mode: Mode) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let name = labels.join(".");
    let found: Vec<&IpAddr> = records
        .get(&name)
        .map(|ips| {
            ips.iter()
                .filter(|ip| matches!((qtype, ip), (1, IpAddr::V4(_)) | (28, IpAddr::V6(_))))
                .collect()
        })
        .unwrap_or_default();
    let rcode: u8 = match mode {
        Mode::Fail => 2,
        _ if !records.contains_key(&name) => 3,
        _ => 0,
    };
    let answers = if rcode == 0 { found } else { Vec::new() };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    // QR, the opcode and RD copied, AA; RA; the rcode.
    out.push(0x80 | (q[2] & 0x79) | 0x04);
    out.push(0x80 | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in answers {
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        match ip {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    Some(out)
}
