//! subway-sink: receives subway-pktgen's UDP frames on a socket and
//! records, for each, its sequence number, flow and the kernel's receive
//! timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME, taken when the frame reached
//! the host, so the sink's own wake-up latency is not counted). The
//! harness turns the records into loss, reordering, duplicates and
//! latency percentiles (see `subway_bench::latency`).
//!
//! Bounded: it stops `--idle` seconds after the last datagram, or after
//! `--duration` seconds in all. Writes 20-byte records (seq u64, flow u32,
//! timestamp u64, little endian) to `--out` and prints one JSON line.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Count and timestamp subway-pktgen's frames on a UDP socket, bounded in time")]
struct Args {
    /// Address to bind (inside a namespace the harness made).
    #[arg(long, default_value = "0.0.0.0:9")]
    bind: std::net::SocketAddr,
    /// Seconds to run at most.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds without a datagram (after the first) that end the run.
    #[arg(long, default_value_t = 1.0)]
    idle: f64,
    /// Where to write the records.
    #[arg(long)]
    out: std::path::PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.duration <= 0.0 || a.duration > 600.0 {
        bail!("--duration must be in (0, 600] seconds");
    }
    let sock = std::net::UdpSocket::bind(a.bind).with_context(|| format!("binding {}", a.bind))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let fd = sock.as_raw_fd();
    let one: libc::c_int = 1;
    let rcvbuf: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with pointers to live ints on our own socket.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            4,
        ) != 0
        {
            bail!("SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
        }
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&rcvbuf as *const libc::c_int).cast(),
            4,
        );
    }
    // Readiness for the harness: bound and listening.
    eprintln!("ready");
    let mut records: Vec<u8> = Vec::with_capacity(1 << 22);
    let mut buf = [0u8; 2048];
    let mut cmsg = [0u64; 16];
    let t0 = Instant::now();
    let mut last: Option<Instant> = None;
    let (mut received, mut stray) = (0u64, 0u64);
    while t0.elapsed().as_secs_f64() < a.duration {
        if last.is_some_and(|l| l.elapsed().as_secs_f64() > a.idle) {
            break;
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid start.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: msg points at live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
        if n < 0 {
            continue;
        }
        last = Some(Instant::now());
        let n = n as usize;
        if n < 12 {
            stray += 1;
            continue;
        }
        let mut ts: u64 = 0;
        // SAFETY: walking the control messages the kernel wrote into cmsg.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    ts = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        received += 1;
        // pktgen stamps (seq, flow) big endian at the start of the payload.
        let seq = u64::from_be_bytes(buf[0..8].try_into().unwrap());
        let flow = u32::from_be_bytes(buf[8..12].try_into().unwrap());
        records.extend_from_slice(&seq.to_le_bytes());
        records.extend_from_slice(&flow.to_le_bytes());
        records.extend_from_slice(&ts.to_le_bytes());
    }
    let mut f = std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    f.write_all(&records)?;
    println!("{{\"received\":{received},\"stray\":{stray}}}");
    Ok(())
}
