//! Backends that speak raw bytes, for what an actix backend cannot send.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

/// What a [`Scripted`] backend does after reading a request.
pub enum Step {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Waits this many milliseconds.
    Sleep(u64),
    /// Closes the connection (without answering, if nothing was sent).
    Close,
    /// Sends back everything it reads, until the peer closes: a tunnel's far end.
    Echo,
}

impl Step {
    pub fn send(bytes: impl AsRef<[u8]>) -> Step {
        Step::Send(bytes.as_ref().to_vec())
    }
}

/// A backend that speaks raw bytes, for what an actix backend cannot send: for every
/// request it reads (head, and a Content-Length body), `script(connection, request, head)`
/// says what to do. Connections and requests count from 0; each connection has a thread.
pub struct Scripted {
    pub addr: SocketAddr,
    /// Every request head read, with the connection it came on.
    pub requests: Arc<Mutex<Vec<(usize, String)>>>,
}

type Script = dyn Fn(usize, usize, &str) -> Vec<Step> + Send + Sync;

impl Scripted {
    pub fn start(script: impl Fn(usize, usize, &str) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let script: Arc<Script> = Arc::new(script);
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                let (seen, script) = (seen.clone(), script.clone());
                std::thread::spawn(move || Self::serve(conn, n, &seen, &*script));
            }
        });
        Scripted { addr, requests }
    }

    fn serve(mut conn: TcpStream, n: usize, seen: &Mutex<Vec<(usize, String)>>, script: &Script) {
        for i in 0.. {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<u64>().ok())?
                })
                .unwrap_or(0);
            if std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink()).is_err() {
                return;
            }
            seen.lock().unwrap().push((n, head.clone()));
            for step in script(n, i, &head) {
                match step {
                    Step::Send(bytes) => {
                        if conn.write_all(&bytes).is_err() {
                            return;
                        }
                    }
                    Step::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
                    Step::Close => return,
                    Step::Echo => {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(k @ 1..) = conn.read(&mut buf) {
                            if conn.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                        return;
                    }
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request heads read so far.
    pub fn heads(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// How many connections the requests came on.
    pub fn connections(&self) -> usize {
        let seen = self.requests.lock().unwrap();
        seen.iter()
            .map(|(c, _)| *c)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

/// A backend that answers every request with `response`, raw bytes, then closes.
pub struct RawBackend(pub Scripted);

impl RawBackend {
    pub fn start(response: &'static [u8]) -> RawBackend {
        RawBackend(Scripted::start(move |_, _, _| {
            vec![Step::send(response), Step::Close]
        }))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }
}
