//! The control socket: a running instance answers requests on
//! /run/subway/NAME.sock. One request per connection, a JSON line in
//! (protocol.rs), JSON out. Used by `subway show`, `reload` and `route`
//! (and by scripts).

use crate::local::RequestServer;
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
    pub fn serve(&mut self, mut answer: impl FnMut(&str) -> String) {
        self.0.serve(|req| answer(req.lines().next().unwrap_or("").trim()));
    }
}

/// Sends one request to instance `name` and returns its answer; an
/// answer that is `{"error": ...}` is an error.
pub fn ask(name: &str, req: &Request) -> anyhow::Result<serde_json::Value> {
    let reply = request(name, &req.to_line())?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| anyhow::anyhow!("instance {name} sent invalid JSON ({e})"))?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// Sends one request line to instance `name` and returns the reply.
fn request(name: &str, req: &str) -> std::io::Result<String> {
    let path = socket_path(name);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{}: {e} (is `subway run` running for {name}?)", path.display()),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
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
