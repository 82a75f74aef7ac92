//! The local ways in: a Unix socket that answers one request per
//! connection (the control socket, the WireGuard UAPI socket), served from
//! the control thread without ever blocking it.
//!
//! Handshakes, timers and signals run on the control thread, and any local
//! user may connect. So nothing here waits: connections are accepted and
//! read without blocking, a request is answered only once it is complete,
//! and a connection that says nothing for [`REQUEST_DEADLINE`], sends more
//! than its limit, or would make the number of open connections exceed
//! [`MAX_PENDING`] is closed. Only root and the daemon's own user are
//! answered (SO_PEERCRED); the socket file is 0600 whatever the umask.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a client has to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Connections waiting for their request, at most.
pub const MAX_PENDING: usize = 64;
/// How long a reply may take to write (a client that does not read).
const WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// Binds a non-blocking Unix socket at `path`, mode 0600, replacing a
/// stale file left by a crash but refusing one a live process still
/// answers on (`in_use` says who).
pub fn bind_unix(path: &Path, in_use: &str) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{in_use} ({})", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Whatever the umask was at bind: the UAPI answers with the private key.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Whether `path` is a socket a live process answers on (a stale one left
/// by a crash refuses connections).
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// What the server refused, by reason (for `subway show`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusals {
    pub not_permitted: u64,
    pub too_large: u64,
    pub timed_out: u64,
    pub too_many: u64,
}

impl Refusals {
    pub fn named(&self) -> [(&'static str, u64); 4] {
        [
            ("not_permitted", self.not_permitted),
            ("too_large", self.too_large),
            ("timed_out", self.timed_out),
            ("too_many", self.too_many),
        ]
    }
}

struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// How a request is answered.
pub enum Reply {
    /// One reply, then the connection closes.
    Text(String),
    /// The connection is handed to the function, on a thread of its own
    /// (a stream: `subway capture`); the server goes on at once.
    Stream(Box<dyn FnOnce(UnixStream) + Send>),
}

impl Reply {
    /// `value` as JSON, serialized and written on a thread of its own:
    /// the control thread only gathers it (`subway show` with 10,000
    /// peers and 100,000 routes is 18 MB, ~250 ms to serialize and write
    /// to a client that reads at its own pace).
    pub fn json_later<T: serde::Serialize + Send + 'static>(value: T) -> Reply {
        Reply::Stream(Box::new(move |stream| {
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let mut w = std::io::BufWriter::with_capacity(64 * 1024, &stream);
            if serde_json::to_writer(&mut w, &value).is_ok() {
                let _ = w.flush();
            }
        }))
    }
}

/// One socket's server.
pub struct RequestServer {
    listener: UnixListener,
    path: PathBuf,
    pending: Vec<Pending>,
    /// Largest request accepted, in bytes.
    max_request: usize,
    /// Whether the bytes so far form a whole request.
    complete: fn(&[u8]) -> bool,
    pub refused: Refusals,
}

/// The uid of the peer of a Unix stream.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size we pass, on a valid fd.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

impl RequestServer {
    /// Serves `path`; a request is at most `max_request` bytes and ends
    /// where `complete` says (or when the client shuts its side down).
    pub fn bind(path: PathBuf, in_use: &str, max_request: usize, complete: fn(&[u8]) -> bool) -> std::io::Result<Self> {
        let listener = bind_unix(&path, in_use)?;
        Ok(RequestServer {
            listener,
            path,
            pending: Vec::new(),
            max_request,
            complete,
            refused: Refusals::default(),
        })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }

    /// The connections still waiting for (the rest of) their request.
    pub fn pending_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.pending.iter().map(|p| p.stream.as_raw_fd())
    }

    /// Accepts what is waiting, reads what has arrived, and answers every
    /// request that is complete with `answer(request)`. Never blocks but
    /// for writing a reply (at most [`WRITE_TIMEOUT`] each).
    pub fn serve(&mut self, mut answer: impl FnMut(&str) -> String) {
        self.serve_with(|req| Reply::Text(answer(req)))
    }

    /// [`RequestServer::serve`], where a request may also be answered
    /// with a stream.
    pub fn serve_with(&mut self, mut answer: impl FnMut(&str) -> Reply) {
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        let now = Instant::now();
        while let Ok((stream, _)) = self.listener.accept() {
            if !peer_uid(&stream).is_some_and(|u| u == 0 || u == own) {
                self.refused.not_permitted += 1;
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                // The oldest silent client makes room: a flood of idle
                // connections cannot lock out the operator.
                self.pending.remove(0);
                self.refused.too_many += 1;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.pending.push(Pending {
                stream,
                buf: Vec::new(),
                deadline: now + REQUEST_DEADLINE,
            });
        }
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let mut chunk = [0u8; 4096];
            let mut eof = false;
            loop {
                match p.stream.read(&mut chunk) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        p.buf.extend_from_slice(&chunk[..n]);
                        if p.buf.len() > self.max_request {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if p.buf.len() > self.max_request {
                self.refused.too_large += 1;
                self.pending.swap_remove(i);
                continue;
            }
            if eof && p.buf.is_empty() {
                // Connected and closed without a word: a liveness probe
                // (`subway show` without a name checks every socket).
                self.pending.swap_remove(i);
                continue;
            }
            if eof || (self.complete)(&p.buf) {
                let p = self.pending.swap_remove(i);
                let req = String::from_utf8_lossy(&p.buf).into_owned();
                let _ = p.stream.set_nonblocking(false);
                match answer(&req) {
                    Reply::Text(reply) => {
                        let _ = p.stream.set_write_timeout(Some(WRITE_TIMEOUT));
                        let _ = (&p.stream).write_all(reply.as_bytes());
                    }
                    Reply::Stream(f) => {
                        let stream = p.stream;
                        if let Err(e) = std::thread::Builder::new()
                            .name("subway-stream".into())
                            .spawn(move || f(stream))
                        {
                            tracing::warn!("could not start a thread for a stream: {e}");
                        }
                    }
                }
                continue;
            }
            if now > p.deadline {
                self.refused.timed_out += 1;
                self.pending.swap_remove(i);
                continue;
            }
            i += 1;
        }
    }
}

impl Drop for RequestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(b: &[u8]) -> bool {
        b.contains(&b'\n')
    }

    fn server(max: usize) -> (RequestServer, PathBuf) {
        let path = std::env::temp_dir().join(format!("subway-local-{}-{max}.sock", std::process::id()));
        let s = RequestServer::bind(path.clone(), "test", max, line).unwrap();
        (s, path)
    }

    #[test]
    fn silent_and_oversized_clients_do_not_hold_up_a_real_request() {
        let (mut s, path) = server(1024);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let idle: Vec<UnixStream> = (0..50).map(|_| UnixStream::connect(&path).unwrap()).collect();
        let mut big = UnixStream::connect(&path).unwrap();
        big.set_nonblocking(true).unwrap();
        let _ = big.write(&vec![b'x'; 8192]);
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"show\n").unwrap();
        let t0 = Instant::now();
        let mut asked = Vec::new();
        s.serve(|r| {
            asked.push(r.to_string());
            "answer".into()
        });
        assert!(t0.elapsed() < Duration::from_millis(100), "{:?}", t0.elapsed());
        assert_eq!(asked, vec!["show\n".to_string()]);
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out, "answer");
        assert_eq!(s.refused.too_large, 1);
        assert_eq!(s.pending.len(), 50, "the idle ones wait (bounded by the deadline)");
        drop(idle);
    }

    #[test]
    fn a_flood_of_connections_is_capped() {
        let (mut s, path) = server(64);
        let _idle: Vec<UnixStream> = (0..MAX_PENDING + 10)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        s.serve(|_| String::new());
        assert_eq!(s.pending.len(), MAX_PENDING);
        assert_eq!(s.refused.too_many, 10);
    }
}
