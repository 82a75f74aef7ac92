//! The dataplane's error type. Its variant says what failed, so that a
//! caller can tell a configuration to fix from a change that needs a
//! restart from the kernel refusing a request; the message says where.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the configuration asks for does not fit this host: a missing
    /// or non-Ethernet interface, an MTU the UMEM frames cannot hold, a
    /// LAN without addresses, more routes or queues than the XDP tables
    /// take. Fix the configuration (or the host) and start again.
    #[error("{0}")]
    Config(String),
    /// A live change that only a restart can make (the [Lan] interfaces
    /// or their VNETs): nothing was changed.
    #[error("{0}")]
    NeedsRestart(String),
    /// A system call failed (netlink, a sysctl file, the TUN, running a
    /// tool): what was asked, and the OS error.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The kernel refused a change made with its tools (`nft`, `ip`).
    #[error("{0}")]
    Kernel(String),
    /// The XDP program: loading, verifying, attaching, a map update.
    #[error("{0}")]
    Xdp(String),
    /// An AF_XDP socket or its UMEM could not be set up.
    #[error("{0}")]
    Xsk(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub fn config(m: impl Into<String>) -> Self {
        Error::Config(m.into())
    }
}

/// Adds context to an XDP (aya) or AF_XDP (xsk-rs) error.
pub trait Context<T> {
    /// An [`Error::Xdp`] saying what was being done.
    fn xdp(self, what: impl FnOnce() -> String) -> Result<T>;
    /// An [`Error::Xsk`] saying what was being done.
    fn xsk(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn xdp(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Xdp(format!("{}: {e}", what())))
    }
    fn xsk(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Xsk(format!("{}: {e}", what())))
    }
}
