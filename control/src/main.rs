//! `subway`: parses the command line and dispatches. Where things are:
//! - [`daemon`]: `subway run`, the control thread's loop;
//! - [`capture`]: `subway capture`, both ends (the stream and the CLI);
//! - [`commands`]: the other commands (check, fence, down, show, reload,
//!   route, health), clients of the control socket or of the kernel's state;
//! - [`health`]: the verdict `subway health` asks the control thread for;
//! - [`protocol`] and [`ctl`]: the control socket's typed requests and the
//!   socket itself; [`local`]: the server every local socket uses;
//! - [`status`]: the typed status `show`, `show --json` and [`metrics`]
//!   render; [`routes`]: route questions; [`config`]: the config file;
//! - [`gateway`]: the WireGuard device's I/O (handshakes, timers, the
//!   slow path); [`live`]: live changes; [`uapi`]: `wg show` / `wg set`;
//!   [`liveness`]: systemd's readiness and watchdog.

mod capture;
mod commands;
mod config;
mod ctl;
mod daemon;
mod doctor;
mod export;
mod gateway;
mod ha;
mod health;
mod live;
mod liveness;
mod local;
mod metrics;
mod probe;
mod protocol;
mod routes;
mod status;
mod uapi;

use anyhow::Result;
use clap::{Parser, Subcommand};
use config::Config;
use protocol::RouteQuery;
use std::path::{Path, PathBuf};
use subway_dataplane::{DataplaneConfig, LanConfig, PeerRoutes};

/// subway: a site-to-site WireGuard gateway whose packet path runs in
/// userspace on AF_XDP.
///
/// Configuration is one file per gateway, a superset of wg-quick's format
/// ([Interface], [Lan], [Peer], [HA], [Export], [Tuning], [Metrics]); see
/// subway.conf(5). The instance name is the file's stem. `subway run`
/// needs root, or CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON and
/// CAP_IPC_LOCK (the systemd unit subway@.service grants exactly these).
#[derive(Parser, Debug)]
#[command(name = "subway", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive);
    /// RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a gateway in the foreground until SIGINT or SIGTERM.
    ///
    /// Loads the XDP program on every [Lan] interface, binds one AF_XDP
    /// socket per interface and RX queue, starts one worker per queue
    /// pinned to a core, and serves `subway show` on /run/subway/NAME.sock.
    /// On exit it detaches XDP and closes the sockets; if it dies, the
    /// kernel detaches XDP itself and traffic falls back to the kernel.
    Run {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Install the fail-safe table of an instance from its configuration
    /// file, without starting it: the kernel refuses (ICMP administratively
    /// prohibited) any packet for a peer's AllowedIPs that would leave in
    /// clear. For boot, before the network is up (subway-fence@.service);
    /// `subway run` installs it too, and `subway down` removes it.
    Fence {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Remove everything an instance that is not running left in the
    /// kernel: its fail-safe table (tunnelled prefixes refused, VNET
    /// interfaces fenced) and a stale control socket. Traffic for the
    /// peers' prefixes is then routed by the kernel as if subway had never
    /// run, in clear if a route leads out.
    Down {
        /// Instance name (the config file's stem).
        name: String,
    },
    /// Validate a configuration file (syntax, keys, prefixes, interfaces)
    /// without touching the network. Exit status 0 means valid.
    Check {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Ask a running instance about its routes: which route and peer serve
    /// an address, what each VNET routes, which prefixes overlap.
    Route {
        #[command(subcommand)]
        query: RouteQuery,
        /// Instance name; optional when only one instance runs.
        #[arg(long, global = true)]
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Re-read the running instance's configuration file and apply the
    /// differences without a restart: peers added, removed or changed,
    /// their AllowedIPs, LAN Subnets. Sessions of unchanged peers stay up.
    /// An invalid file changes nothing. Same as SIGHUP.
    Reload {
        /// Instance name; optional when only one instance runs.
        name: Option<String>,
    },
    /// Exit status 0 if a running instance can carry traffic now, else 1
    /// with one line naming the reason (for keepalived's track_script).
    ///
    /// Checks, in this order, the first that fails being the reason: every
    /// worker's loop turned within --stall-ms; the uplink is up with carrier
    /// and the kernel routes every peer's endpoint through it; with
    /// --handshake-within, some peer completed a handshake less than SECS
    /// ago (not asked in the first SECS after the box became active: a
    /// fresh box needs one round trip). Prints `NAME: healthy`, `NAME:
    /// unhealthy: REASON`, or `NAME: not running: WHY` when the control
    /// socket is missing, refuses connections or does not answer within
    /// 1 s (a wedged control thread).
    Health {
        /// Instance name (the config file's stem).
        name: String,
        /// Require a handshake with some peer within the last SECS seconds.
        /// With PersistentKeepalive an idle tunnel still renews its session
        /// every 2 minutes (180 suits it); without, an idle tunnel makes no
        /// handshakes.
        #[arg(long, value_name = "SECS")]
        handshake_within: Option<u64>,
        /// Longest a worker's loop may stand still [default: 500].
        #[arg(long, value_name = "MS")]
        stall_ms: Option<u64>,
        /// Print the instance's JSON answer (healthy, reason, checks)
        /// instead of one line.
        #[arg(long)]
        json: bool,
    },
    /// [Export]: withdraw every route this instance exports for a routing
    /// daemon (BIRD withdraws them from its BGP peers) while it keeps
    /// forwarding, so that the LAN's routers move to the other gateways
    /// before maintenance. --undo exports again. A clean stop (SIGTERM)
    /// drains by itself first, for DrainSeconds.
    Drain {
        /// Instance name; optional when only one instance runs.
        name: Option<String>,
        /// Export again.
        #[arg(long)]
        undo: bool,
    },
    /// Reads this box and says what is wrong or worth changing, each
    /// finding with the command that fixes it: interfaces (driver, AF_XDP
    /// zero-copy, RX queues, offloads that break XDP, MTU against the
    /// tunnel, another XDP program, queue interrupts), sysctls, clock
    /// synchronization; and proposes a [Tuning] (queues, cores) with the
    /// reasons. Exit status 1 on errors, 0 on warnings only.
    Doctor {
        /// The instance's config: its interfaces are examined (default:
        /// every interface but lo).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON (findings, plan, the facts read).
        #[arg(long)]
        json: bool,
    },
    /// Capture what the fast path receives and sends, as pcapng for
    /// tcpdump or Wireshark (tcpdump on the interfaces cannot see it:
    /// AF_XDP takes frames before the kernel's taps).
    ///
    /// The workers copy each frame that passes FILTER (tcpdump's filter
    /// language, compiled by libpcap) as it arrives on a port and as it
    /// leaves one: on a LAN the plaintext packets, on the uplink the
    /// WireGuard datagrams. Copies go through a bounded buffer per worker;
    /// when the writer falls behind, frames are dropped from the capture
    /// (counted, printed at the end), never from forwarding. Frames the
    /// kernel handles (XDP_PASS) are for tcpdump itself. Examples:
    ///
    ///   subway capture gw -w - icmp | tcpdump -n -r -
    ///
    ///   subway capture gw -i wan0 -c 100 -w wg.pcap udp port 51820
    Capture {
        /// Instance name (the config file's stem).
        name: String,
        /// Only this port (a [Lan] interface or the uplink).
        #[arg(short = 'i', long)]
        interface: Option<String>,
        /// Only frames from or to this peer (public key, base64).
        #[arg(long)]
        peer: Option<String>,
        /// Only the LAN side (plaintext).
        #[arg(long, conflicts_with = "outer")]
        inner: bool,
        /// Only the uplink (WireGuard datagrams).
        #[arg(long)]
        outer: bool,
        /// Stop after COUNT frames.
        #[arg(short = 'c', long)]
        count: Option<u64>,
        /// Stop after SECS seconds.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Bytes kept per frame [default: the whole frame].
        #[arg(short = 's', long)]
        snaplen: Option<u32>,
        /// Write pcapng to FILE, or to stdout with `-`.
        #[arg(short = 'w', long, value_name = "FILE")]
        write: PathBuf,
        /// tcpdump filter expression (several words are joined).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        filter: Vec<String>,
    },
    /// Writes the man pages (subway.8, one page per subcommand,
    /// subway.conf.5) and the bash, zsh and fish completions into DIR
    /// (for packaging).
    #[command(hide = true)]
    GenDocs {
        /// Output directory (man/ and completions/ are made inside).
        dir: PathBuf,
    },
    /// Show a running instance: workers (queue, core, mode, packet and
    /// byte counters), drops and slow-path hand-offs by reason, XDP
    /// counters.
    Show {
        /// Instance name (the config file's stem); optional when only one
        /// instance runs.
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Refresh once a second, with packets and bits per second per
        /// peer (until interrupted).
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
}

/// `subway gen-docs DIR`: man pages and completions from the clap
/// definitions, and subway.conf(5) from the config's key table.
fn gen_docs(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command();
    let page = |c: clap::Command, file: &str| -> Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).section("8").render(&mut buf)?;
        std::fs::write(man.join(file), buf)?;
        Ok(())
    };
    page(cmd.clone(), "subway.8")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name: &'static str = Box::leak(format!("subway-{}", sub.get_name()).into_boxed_str());
        page(sub.clone().name(name), &format!("{name}.8"))?;
    }
    std::fs::write(
        man.join("subway.conf.5"),
        config::doc::man_page(env!("CARGO_PKG_VERSION")),
    )?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "subway", &comp)?;
    }
    println!("man pages in {}, completions in {}", man.display(), comp.display());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_level, &cli.log_format);
    let r = match cli.cmd {
        Cmd::Run { config } => daemon::run(&config),
        Cmd::Check { config } => commands::check(&config),
        Cmd::Fence { config } => commands::fence(&config),
        Cmd::Down { name } => commands::down(&name),
        Cmd::Show { name, json, watch } => match watch {
            true => commands::watch(name),
            false => commands::show(name, json),
        },
        Cmd::Reload { name } => commands::reload(name),
        Cmd::Drain { name, undo } => commands::drain(name, undo),
        Cmd::GenDocs { dir } => gen_docs(&dir),
        Cmd::Capture {
            name,
            interface,
            peer,
            inner,
            outer,
            count,
            duration,
            snaplen,
            write,
            filter,
        } => {
            let req = capture::CaptureRequest {
                interface,
                peer,
                side: match (inner, outer) {
                    (true, _) => capture::Side::Inner,
                    (_, true) => capture::Side::Outer,
                    _ => capture::Side::Both,
                },
                count,
                duration_ms: duration.map(|s| (s.max(0.0) * 1000.0) as u64),
                snaplen,
                filter: filter.join(" "),
            };
            capture::client(&name, &req, &write)
        }
        Cmd::Doctor { config, json } => commands::doctor(config.as_deref(), json),
        Cmd::Route { query, name, json } => commands::route(name, query, json),
        Cmd::Health {
            name,
            handshake_within,
            stall_ms,
            json,
        } => std::process::exit(if commands::health(&name, handshake_within, stall_ms, json) {
            0
        } else {
            1
        }),
    };
    if let Err(e) = r {
        eprintln!("subway: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

pub(crate) fn load(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

pub(crate) fn dataplane_config(cfg: &Config) -> DataplaneConfig {
    let vnets = cfg.vnet_ids();
    let vnet_id = |n: &str| vnets.iter().position(|v| v == n).unwrap_or(0) as u32;
    DataplaneConfig {
        name: cfg.name.clone(),
        lans: cfg
            .lans
            .iter()
            .map(|l| LanConfig {
                ifname: l.interface.clone(),
                subnets: l.subnets.clone(),
                vnet: vnet_id(&l.vnet),
                routes: l
                    .routes
                    .iter()
                    .map(|(prefix, hops, _)| subway_dataplane::config::ViaRoute {
                        prefix: *prefix,
                        hops: hops.clone(),
                    })
                    .collect(),
            })
            .collect(),
        queues: cfg.tuning.queues.clone(),
        cores: cfg.tuning.cores.clone(),
        xsk: cfg.tuning.xsk,
        xdp_mode: cfg.tuning.xdp_mode,
        uplink: cfg.interface.uplink.as_ref().map(|(u, _)| u.clone()),
        listen_port: 0,
        source_ports: cfg.tuning.spread(),
        fail_open: cfg.interface.fail_open,
        policies: policy_configs(cfg, &vnet_id),
        flows: cfg.tuning.flows,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerRoutes {
                id: p.id,
                vnet: vnet_id(&p.vnet),
                allowed_ips: p.allowed_ips.iter().map(|(n, _)| *n).collect(),
                priority: p.group.as_ref().map(|g| g.priority),
                up: true,
            })
            .collect(),
    }
}

/// The [Policy] sections as the dataplane takes them: VNET ids, LAN port
/// indices (a [Lan]'s port is its position) and peer ids.
fn policy_configs(cfg: &Config, vnet_id: &dyn Fn(&str) -> u32) -> Vec<subway_dataplane::policy::PolicyConfig> {
    use config::policy::RuleFrom;
    use subway_dataplane::policy::{Ingress, PolicyConfig, Rule};
    cfg.policies
        .iter()
        .map(|p| PolicyConfig {
            vnet: vnet_id(&p.vnet),
            default: p.default,
            rules: p
                .rules
                .iter()
                .map(|r| Rule {
                    action: r.action,
                    ingress: match &r.ingress {
                        None => None,
                        // `subway check` refuses names that resolve to
                        // nothing; should one slip through, it matches
                        // nothing rather than everything.
                        Some(RuleFrom::Lan(n)) => Some(
                            cfg.lans
                                .iter()
                                .position(|l| &l.interface == n)
                                .map_or(Ingress::Lan(u16::MAX), |i| Ingress::Lan(i as u16)),
                        ),
                        Some(RuleFrom::Peer(k)) => Some(
                            cfg.peers
                                .iter()
                                .find(|q| q.public_key == *k)
                                .map_or(Ingress::Lan(u16::MAX), |q| Ingress::Peer(q.id)),
                        ),
                    },
                    src: r.src,
                    dst: r.dst,
                    proto: r.proto,
                    ports: r.ports,
                    text: r.text.clone(),
                    line: r.line,
                })
                .collect(),
        })
        .collect()
}
