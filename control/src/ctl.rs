//! The control socket: a running instance answers requests on
//! /run/subway/NAME.sock. One request per connection, a line of text in,
//! JSON out. Used by `subway show` (and by tests and scripts).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RUN_DIR: &str = "/run/subway";

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.sock"))
}

/// The listening side, owned by the control thread. Removes its socket
/// file on drop.
pub struct CtlServer {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds a non-blocking Unix socket at `path`, replacing a stale file left
/// by a crash but refusing one a live process still answers on (`in_use`
/// says who).
pub fn bind_unix(path: &std::path::Path, in_use: &str) -> std::io::Result<UnixListener> {
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
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl CtlServer {
    pub fn bind(name: &str) -> std::io::Result<Self> {
        let path = socket_path(name);
        let listener = bind_unix(&path, &format!("an instance named {name} is already running"))?;
        Ok(CtlServer { listener, path })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// Serves every pending connection with `answer(request line)`.
    pub fn serve(&self, mut answer: impl FnMut(&str) -> String) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(false);
            // A silent client must not hold up the control thread.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
            let mut line = String::new();
            let mut r = BufReader::new(&stream);
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let reply = answer(line.trim());
            let mut w = &stream;
            let _ = w.write_all(reply.as_bytes());
        }
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to instance `name` and returns the reply.
pub fn request(name: &str, req: &str) -> std::io::Result<String> {
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

/// Names of the instances with a socket in the run directory.
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
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
