//! The control socket: a running instance answers requests on
//! /run/subway/NAME.sock. One request per connection, a JSON line in
//! (protocol.rs), JSON out. Used by `subway show`, `reload`, `route` and
//! `health` (and by scripts); `subway capture` gets a JSON line, then a
//! pcapng stream (capture.rs).

use crate::local::{Reply, RequestServer};
use crate::protocol::Request;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RUN_DIR: &str = "/run/subway";

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.sock"))
}

/// The listening side, owned by the control thread (see `local.rs`: it
/// never blocks on a client). Removes its socket file on drop.
pub struct CtlServer(RequestServer);

/// Longest control request (`route explain ...` is the longest).
const MAX_REQUEST: usize = 4096;

impl CtlServer {
    pub fn bind(name: &str) -> std::io::Result<Self> {
        RequestServer::bind(
            socket_path(name),
            &format!("an instance named {name} is already running"),
            MAX_REQUEST,
            |b| b.contains(&b'\n'),
        )
        .map(CtlServer)
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }

    pub fn pending_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.0.pending_fds()
    }

    pub fn refused(&self) -> crate::local::Refusals {
        self.0.refused
    }

    /// Serves every complete request with `answer(request line)`.
    pub fn serve(&mut self, mut answer: impl FnMut(&str) -> Reply) {
        self.0.serve_with(|req| answer(req.lines().next().unwrap_or("").trim()));
    }
}

/// How long `show`, `reload` and `route` wait for an answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request to instance `name` and returns its answer; an
/// answer that is `{"error": ...}` is an error.
pub fn ask(name: &str, req: &Request) -> anyhow::Result<serde_json::Value> {
    let reply = request(name, &req.to_line(), ASK_TIMEOUT)?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| anyhow::anyhow!("instance {name} sent invalid JSON ({e})"))?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// Sends one request to instance `name` and returns the reply, all of it
/// (connect, send, answer) within `timeout`, or an error of kind
/// `TimedOut`. A control thread that does not accept (wedged, or the
/// process stopped) would otherwise hold a connect once the listen
/// backlog is full, where a read timeout does not reach: the exchange
/// runs on a thread of its own, left behind if it overruns (callers are
/// one-shot commands that exit right after).
pub fn request_within(name: &str, req: &Request, timeout: Duration) -> std::io::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (name, line) = (name.to_string(), req.to_line());
    std::thread::spawn(move || {
        let _ = tx.send(request(&name, &line, timeout));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} ms", timeout.as_millis()),
        ))
    })
}

/// Sends one request line to instance `name` and returns the reply,
/// waiting at most `timeout` for each read.
fn request(name: &str, req: &str, timeout: Duration) -> std::io::Result<String> {
    let path = socket_path(name);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{}: {e} (is `subway run` running for {name}?)", path.display()),
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Names of the running instances: those with a socket in the run
/// directory that answers (a crashed instance's stale socket does not).
pub fn instances() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".sock"))
                        .map(str::to_string)
                })
                .filter(|n| crate::local::is_live(&socket_path(n)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
