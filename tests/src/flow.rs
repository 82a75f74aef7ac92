//! [`UdpFlow`]: a sequenced UDP flow between namespaces at a fixed rate,
//! and the [`FlowReport`] of loss, duplicates and reordering at its sink.

use crate::Netns;
use crate::netns::in_netns;
use anyhow::{Context, Result, anyhow};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the sink of a [`UdpFlow`] saw.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FlowReport {
    pub sent: u32,
    pub received: u32,
    /// Sequence numbers never received.
    pub lost: u32,
    pub duplicates: u32,
    /// Datagrams that arrived after a higher sequence number.
    pub reordered: u32,
    /// Each datagram's sequence number and arrival time at the sink.
    pub arrivals: Vec<(u32, Instant)>,
}

impl std::fmt::Debug for FlowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {}, received {}, lost {}, duplicates {}, reordered {}",
            self.sent, self.received, self.lost, self.duplicates, self.reordered
        )
    }
}

impl FlowReport {
    /// Sequence numbers in `range` (within what was sent) that never arrived.
    pub fn lost_in(&self, range: std::ops::Range<u32>) -> u32 {
        let mut seen = vec![false; self.sent as usize];
        for (q, _) in &self.arrivals {
            if let Some(s) = seen.get_mut(*q as usize) {
                *s = true;
            }
        }
        let end = range.end.min(self.sent);
        (range.start.min(end)..end).filter(|q| !seen[*q as usize]).count() as u32
    }

    /// The longest time between two arrivals at the sink.
    pub fn longest_gap(&self) -> Duration {
        self.arrivals
            .windows(2)
            .map(|w| w[1].1.duration_since(w[0].1))
            .max()
            .unwrap_or_default()
    }

    /// The first datagram to arrive after `t`, and when.
    pub fn first_after(&self, t: Instant) -> Option<(u32, Instant)> {
        self.arrivals.iter().find(|(_, at)| *at > t).copied()
    }
}

/// Sequence numbers in the order they arrived, with their arrival times.
type Arrivals = Vec<(u32, Instant)>;

/// A bounded UDP flow with sequence numbers, from a sender namespace to a
/// sink namespace, at a fixed rate, checked at the sink for loss,
/// duplicates and reordering. Runs in the background while a test changes
/// things; [`UdpFlow::finish`] waits for it.
pub struct UdpFlow {
    sink: std::thread::JoinHandle<Result<(Arrivals, u32)>>,
    sender: std::thread::JoinHandle<Result<u32>>,
}

impl UdpFlow {
    /// Sends `count` datagrams of `size` bytes (at least 8) to `dst` at
    /// `pps` from `from`, received by a socket bound in `sink`.
    pub fn start(from: &Netns, sink: &Netns, dst: SocketAddr, count: u32, pps: u32, size: usize) -> Result<UdpFlow> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let bind: SocketAddr = match dst {
            SocketAddr::V4(_) => format!("0.0.0.0:{}", dst.port()).parse()?,
            SocketAddr::V6(_) => format!("[::]:{}", dst.port()).parse()?,
        };
        let period = Duration::from_secs_f64(1.0 / pps.max(1) as f64);
        let sink = in_netns(sink.name.clone(), move || {
            let s = std::net::UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            ready_tx.send(()).ok();
            let mut order = Vec::with_capacity(count as usize);
            let mut buf = [0u8; 2048];
            let mut last_rx = Instant::now();
            let budget = period * count + Duration::from_secs(20);
            let t0 = Instant::now();
            let mut done_marker = 0;
            // Until the sender says it is done and nothing came for 1 s, bounded.
            while t0.elapsed() < budget {
                match s.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        last_rx = Instant::now();
                        let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        if seq == u32::MAX {
                            done_marker += 1;
                        } else {
                            order.push((seq, last_rx));
                        }
                    }
                    _ => {
                        if done_marker > 0 && last_rx.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                        if order.len() as u32 >= count && last_rx.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                    }
                }
            }
            Ok((order, done_marker))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the flow's sink did not start")?;
        let sender = in_netns(from.name.clone(), move || {
            let s = std::net::UdpSocket::bind(match dst {
                SocketAddr::V4(_) => "0.0.0.0:0",
                SocketAddr::V6(_) => "[::]:0",
            })?;
            let mut buf = vec![0u8; size.max(8)];
            let t0 = Instant::now();
            for seq in 0..count {
                let due = t0 + period * seq;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                buf[..4].copy_from_slice(&seq.to_be_bytes());
                s.send_to(&buf, dst)?;
            }
            std::thread::sleep(Duration::from_millis(200));
            buf[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            for _ in 0..3 {
                let _ = s.send_to(&buf, dst);
            }
            Ok(count)
        });
        Ok(UdpFlow { sink, sender })
    }

    /// Waits for the flow to end and checks what the sink saw.
    pub fn finish(self) -> Result<FlowReport> {
        let sent = self.sender.join().map_err(|_| anyhow!("flow sender panicked"))??;
        let (order, _) = self.sink.join().map_err(|_| anyhow!("flow sink panicked"))??;
        let mut seen = vec![false; sent as usize];
        let mut r = FlowReport {
            sent,
            received: order.len() as u32,
            ..Default::default()
        };
        let mut highest: Option<u32> = None;
        for &(q, _) in &order {
            match seen.get_mut(q as usize) {
                Some(s) if *s => r.duplicates += 1,
                Some(s) => *s = true,
                None => r.duplicates += 1,
            }
            if highest.is_some_and(|h| q < h) {
                r.reordered += 1;
            }
            highest = highest.max(Some(q));
        }
        r.lost = seen.iter().filter(|s| !**s).count() as u32;
        r.arrivals = order;
        Ok(r)
    }
}
