//! The namespace test kit: builds topologies of network namespaces joined
//! by veth pairs, runs commands in them, starts and stops `subway`, and
//! removes everything in `Drop`, even when a test fails or panics.
//!
//! Names are unique per process and call (`sw<pid>x<n>...`) so tests can
//! run in parallel. Interfaces are created directly inside their namespace,
//! so their names there (lan0, eth0, ...) never collide with the host's.
//!
//! Where things are:
//!
//! - `env`: the host: [`unique`] names, [`require_root`], [`host`]
//!   commands, programs on PATH ([`which`]), this workspace's binaries
//!   ([`workspace_bin`], [`profile_bin`]) and the [`work_dir`].
//! - `netns`: [`Netns`], [`veth`] pairs, [`xdp_attached`].
//! - `proc`: [`Proc`], a background process ended on drop.
//! - `subway`: [`Subway`], a running gateway and its control socket.
//! - `topology`: [`TwoSubnets`], [`TwoSites`], [`SitesOnABridge`].
//! - `wg`: [`wg_keypair`] and [`WgPeer`], a standard WireGuard peer.
//! - `capture`: [`Capture`], tcpdump in a namespace.
//! - `traffic`: [`ping`], [`ping_until`], [`tcp_echo`], [`tcp_mss_seen`],
//!   [`icmp_in_echos`], [`icmp6_in_echos`], and [`wait_until`].
//! - `flow`: [`UdpFlow`] and its [`FlowReport`].
//! - `keepalived`: [`Keepalived`], VRRP in a namespace.
//! - `bird`: [`Bird`], BGP and BFD in a namespace.
//!
//! The end-to-end tests that use the kit are in `tests/tests/`.

mod bird;
mod capture;
mod env;
mod flow;
mod keepalived;
mod netns;
mod proc;
mod subway;
mod topology;
mod traffic;
mod wg;

pub use bird::Bird;
pub use capture::{Capture, udp_ports_from, udp_ports_to};
pub use env::{
    host, is_root, log_time, profile_bin, require_root, unique, wall_time_of_day, which, work_dir, workspace_bin,
};
pub use flow::{FlowReport, UdpFlow};
pub use keepalived::Keepalived;
pub use netns::{Netns, veth, veth_queues, xdp_attached};
pub use proc::Proc;
pub use subway::Subway;
pub use topology::{SitesOnABridge, TwoSites, TwoSubnets};
pub use traffic::{icmp_in_echos, icmp6_in_echos, ping, ping_until, tcp_echo, tcp_mss_seen, wait_until};
pub use wg::{WgPeer, wg_keypair};
