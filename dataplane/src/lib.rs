//! subway's packet path. The control crate configures a [`Dataplane`] and
//! drives its housekeeping; nothing here reads config files or talks to
//! users. Where things are:
//!
//! - [`config`]: what the dataplane is asked to run (LANs, peers' routes,
//!   tuning), and what a live change did.
//! - [`lifecycle`]: the running [`Dataplane`]: start, live changes
//!   (`apply`), housekeeping, stop.
//! - [`plan`]: pure planning: the FIB from the config, the workers' view of
//!   the peers, how XDP steers each route, the boot-time fail-safe table.
//! - [`host`]: changes to the kernel's configuration and their undo
//!   (routes to the TUN, forwarding sysctls, VNET isolation), kept apart
//!   from [`failsafe`], the nftables table that outlives the process.
//! - [`xdp`]: the XDP program's loader and maps; [`xsk`]: a worker's
//!   AF_XDP sockets, UMEM and rings; [`worker`]: the per-queue loop;
//!   [`forward`]: LAN-to-LAN decisions; [`tunnel`]: the tunnel's framing,
//!   its send ([`tunnel::tx`]) and receive ([`tunnel::rx`]) batch paths;
//!   [`capture`]: copies of the workers' frames for `subway capture`;
//!   [`policy`]: [Policy] rules, their classifier and the flow table;
//!   [`fib`], [`tables`]: what the workers look up (routes, cryptokey
//!   routing's [`fib::AllowedIps`], neighbours, peers); [`slowpath`] and
//!   [`punt`]: what the fast path hands on; [`trace`]: `route explain`
//!   as a trace of the workers' own decision functions; [`netlink`]: the kernel's
//!   routes, neighbours and addresses; [`stats`]: counters by name;
//!   [`wg`]: the WireGuard engine (sans-IO); [`wire`]: packet views.

pub mod capture;
pub mod config;
pub mod error;
pub mod failsafe;
pub mod fib;
pub mod forward;
pub mod fxhash;
pub mod host;
pub mod lifecycle;
pub mod netlink;
pub mod plan;
pub mod policy;
pub mod punt;
pub mod slowpath;
pub mod stats;
pub mod tables;
pub mod trace;
pub mod tunnel;
pub mod wg;
pub mod wire;
pub mod worker;
pub mod xdp;
pub mod xsk;

pub use config::{DataplaneConfig, LanConfig, PeerRoutes, RouteChanges, UPLINK_VNET};
pub use error::{Error, Result};
pub use host::tun_name;
pub use lifecycle::{Dataplane, UplinkNow, WorkerHandle};
pub use plan::{fence_for_config, fib_from};
pub use subway_common::{MAX_QUEUES, MAX_ROUTES, named_counters};
pub use worker::WorkerInfo;
pub use xdp::XdpAttach;
pub use xsk::{BindMode, XskOptions};
