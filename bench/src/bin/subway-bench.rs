//! subway-bench: runs contenders side by side on the same namespace
//! topology, the same cores and the same generator, and prints one table.
//! The subcommands and their overviews are here; each scenario (its flags,
//! what it measures and against which baseline) is a module of
//! `subway_bench::scenario`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use subway_bench::scenario::{all, crypto, latency, queues, routed, scale, scale_out, tcp, tune, tunnel};

#[derive(Parser, Debug)]
#[command(about = "subway's benchmark harness (needs root; builds its own namespaces and removes them)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The whole comparison in one run, one dated folder: the crypto-only
    /// ceiling of a core, routed mode vs kernel forwarding (the AF_XDP
    /// ceiling), the tunnel in both directions against boringtun-cli and
    /// wireguard-go, one TCP stream through two gateways of each kind,
    /// latency at a fixed load, the tuning sweep; tables, CSV, plots and
    /// a summary.md, then one peer over 2 queues and many peers. About 7
    /// minutes on a 2-core VM; --quick: about 1.
    All(all::Args),
    /// One-way latency percentiles, loss and reordering through two
    /// gateways of each kind, at a fixed offered load.
    Latency(latency::Args),
    /// The crypto-only ceiling: data messages sealed and opened per second
    /// by one core.
    Crypto(crypto::Args),
    /// Which [Tuning] settings win on this box: batch size, ring size,
    /// need_wakeup vs busy poll vs spinning, idle spin, the worker's core,
    /// XDP driver vs generic mode, copy vs zero-copy; routed mode at 64
    /// bytes (the AF_XDP path without crypto, where the knobs matter).
    Tune(tune::Args),
    /// subway routed mode vs kernel forwarding, packets/s at each size.
    Routed(routed::Args),
    /// One TCP stream (iperf3) host to host through two gateways of each
    /// kind: subway, boringtun-cli, wireguard-go.
    Tcp(tcp::Args),
    /// A WireGuard gateway, subway against wireguard-go and boringtun-cli
    /// (kernel forwarding + TUN), packets/s at each size. Encrypt: LAN
    /// frames in, ciphertext counted on the far wire (the far gateway's
    /// kernel drops it unread). Decrypt: the generator is the gateway's
    /// peer, replaying packets it sealed before the clock started, with
    /// fresh counters; plaintext counted on the LAN wire.
    Tunnel(tunnel::Args),
    /// Two subway gateways side by side (each with its own LAN traffic, as
    /// behind a LAN router's ECMP route) against one: the aggregate encrypt
    /// rate. On a 2-core machine both share the cores: indicative only.
    ScaleOut(scale_out::Args),
    /// One peer through 1 and then 2 RX queues and workers (multi-queue
    /// veth), encrypt and decrypt: the rate and the workers' CPU time per
    /// packet, which should stay flat as workers are added.
    Queues(queues::Args),
    /// Many peers and routes on one gateway: the generator plays N
    /// standard WireGuard peers (boringtun) with their own keys and
    /// addresses; check and start time, time until all N have sessions,
    /// memory, the control thread's idle CPU, a one-peer reload and a
    /// rekey storm, at each N (default 0, 1,000 and 10,000 peers with 10
    /// routes each).
    Scale(scale::Args),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::All(a) => all::run(a),
        Cmd::Latency(a) => latency::run(a),
        Cmd::Crypto(a) => crypto::run(a),
        Cmd::Tune(a) => tune::run(a),
        Cmd::Routed(a) => routed::run(a),
        Cmd::Tcp(a) => tcp::run(a),
        Cmd::Tunnel(a) => tunnel::run(a),
        Cmd::ScaleOut(a) => scale_out::run(a),
        Cmd::Queues(a) => queues::run(a),
        Cmd::Scale(a) => scale::run(a),
    }
}
