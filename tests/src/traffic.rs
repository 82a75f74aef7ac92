//! Traffic between namespaces and what it did: pings, a TCP echo, the MSS
//! a server sees, the kernel's ICMP echo counters, and waiting for a
//! condition instead of sleeping.

use crate::Netns;
use crate::netns::in_netns;
use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Pings `count` times, 50 ms apart; an error unless every one answers
/// (iputils exits 0 when a single reply of many arrives, so the summary
/// line is read).
pub fn ping(ns: &Netns, dst: &str, count: u32) -> Result<()> {
    let c = count.to_string();
    let out = ns.output(&["ping", "-c", &c, "-i", "0.05", "-W", "2", "-q", dst])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .split(", ")
        .find_map(|part| part.strip_suffix(" received"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    match received {
        Some(n) if n == count => Ok(()),
        Some(n) => bail!("[{}] ping {dst}: {n} of {count} answered\n{text}", ns.name),
        None => bail!(
            "[{}] ping {dst}: no summary\n{text}{}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Polls `cond` every 20 ms until it holds; an error naming `what` (and
/// the last thing `cond` said) if it does not within `limit`. For waiting
/// on the system under test instead of sleeping a fixed time.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let last = cond();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?} (last: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pings until one answer comes back (the first packets wait for the
/// handshake), bounded to `secs` attempts.
pub fn ping_until(ns: &Netns, dst: &str, secs: u32) -> Result<()> {
    for _ in 0..secs {
        if ns.output(&["ping", "-c", "1", "-W", "1", "-q", dst])?.status.success() {
            return Ok(());
        }
    }
    anyhow::bail!("{dst} did not answer within {secs} attempts")
}

/// A TCP exchange from `client` to `server_addr` served in `server`;
/// returns the source address the server saw.
pub fn tcp_echo(client: &Netns, server: &Netns, server_addr: SocketAddr, bytes: usize) -> Result<SocketAddr> {
    let bind: SocketAddr = match server_addr {
        SocketAddr::V4(_) => format!("0.0.0.0:{}", server_addr.port()).parse()?,
        SocketAddr::V6(_) => format!("[::]:{}", server_addr.port()).parse()?,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<SocketAddr> {
        let srv = s.spawn(move || {
            server.enter(move || -> Result<SocketAddr> {
                let l = TcpListener::bind(bind)?;
                l.set_nonblocking(true)?;
                ready_tx.send(()).ok();
                // Bounded: a client that never connects must not hang the test.
                let t0 = std::time::Instant::now();
                let (mut c, peer) = loop {
                    match l.accept() {
                        Ok(x) => break x,
                        Err(_) if t0.elapsed() < Duration::from_secs(15) => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                c.set_nonblocking(false)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = c.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    c.write_all(&buf[..n])?;
                }
                Ok(peer)
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server did not start")?;
        client.enter(move || -> Result<()> {
            let mut c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
            let mut w = c.try_clone()?;
            let d2 = data.clone();
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                w.write_all(&d2)?;
                w.shutdown(std::net::Shutdown::Write)
            });
            let mut back = Vec::new();
            c.read_to_end(&mut back)?;
            writer.join().unwrap()?;
            anyhow::ensure!(
                back == data,
                "echo differs: {} of {} bytes came back",
                back.len(),
                data.len()
            );
            Ok(())
        })??;
        srv.join().unwrap()?
    })
}

/// The MSS a TCP server in `server` sees for a connection from `client`
/// (TCP_MAXSEG on the accepted socket: the smaller of its own and the one
/// the client's SYN announced, as it arrived).
pub fn tcp_mss_seen(client: &Netns, server: &Netns, server_addr: SocketAddr) -> Result<u32> {
    let bind: SocketAddr = match server_addr {
        SocketAddr::V4(_) => format!("0.0.0.0:{}", server_addr.port()).parse()?,
        SocketAddr::V6(_) => format!("[::]:{}", server_addr.port()).parse()?,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = in_netns(server.name.clone(), move || -> Result<u32> {
        let l = TcpListener::bind(bind)?;
        l.set_nonblocking(true)?;
        ready_tx.send(()).ok();
        let t0 = Instant::now();
        let c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.into()),
            }
        };
        let mut mss: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: TCP_MAXSEG writes one int of the size we pass, on a valid fd.
        let r = unsafe {
            libc::getsockopt(
                c.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&mut mss as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        anyhow::ensure!(r == 0, "getsockopt TCP_MAXSEG: {}", std::io::Error::last_os_error());
        Ok(mss as u32)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the MSS server did not start")?;
    client.enter(|| -> Result<()> {
        let _c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    })??;
    srv.join().map_err(|_| anyhow!("MSS server panicked"))?
}

/// ICMP echo requests this namespace's kernel has received (`InEchos`
/// in /proc/net/snmp), to tell which of two hosts a ping reached.
pub fn icmp_in_echos(ns: &Netns) -> Result<u64> {
    let snmp = ns.run(&["cat", "/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (
        lines.next().context("no Icmp header")?,
        lines.next().context("no Icmp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .context("no InEchos in /proc/net/snmp")?;
    values
        .split_whitespace()
        .nth(i)
        .context("short Icmp line")?
        .parse()
        .context("parsing InEchos")
}

/// ICMPv6 echo requests this namespace's kernel has received.
pub fn icmp6_in_echos(ns: &Netns) -> Result<u64> {
    let snmp6 = ns.run(&["cat", "/proc/net/snmp6"])?;
    snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Icmp6InEchos"))
        .context("no Icmp6InEchos in /proc/net/snmp6")?
        .trim()
        .parse()
        .context("parsing Icmp6InEchos")
}
