//! Changes subway makes to the kernel's configuration while it runs, and
//! their undo on stop: the routes that point the peers' prefixes at the
//! slow-path TUN, the forwarding sysctls of the LANs and the TUN, the
//! isolation of non-default VNETs' interfaces. The fail-safe table is
//! installed from here too, but outlives the undo ([`crate::failsafe`]).

use crate::error::{Error, Result};
use crate::failsafe;
use crate::netlink::Netlink;
use crate::tables::Port;
use ipnet::IpNet;

/// The slow-path TUN's name for an instance: "sw-" and up to 12 characters.
/// Long names keep 7 characters and a hash of the whole name, so that two
/// instances on one host do not collide.
pub fn tun_name(instance: &str) -> String {
    let clean: String = instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if clean.len() <= 12 {
        return format!("sw-{clean}");
    }
    let h = instance
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("sw-{}-{:04x}", &clean[..7], h & 0xffff)
}

/// One change made to the kernel's configuration, and how to undo it.
pub(crate) enum Undo {
    /// A command to run (`ip route append ...`).
    Cmd(Vec<String>),
    /// A sysctl file and the value it had.
    Sysctl(String, String),
}

/// Changes made to the kernel's configuration, undone on stop (or when a
/// start fails half-way), and the fail-safe table, which outlives them.
pub(crate) struct KernelUndo {
    steps: Vec<Undo>,
    /// The fail-safe table as last installed (see [`failsafe`]).
    pub(crate) fence: Option<failsafe::Fence>,
    /// Its tunnel sets, as live changes update them.
    pub(crate) sets: Option<failsafe::Sets>,
    /// The fence's tidy after the last live change, on a thread: whether
    /// nft took it.
    letting_go: Option<std::thread::JoinHandle<bool>>,
    /// A clean stop (or a failed start). A running gateway that exits on
    /// an error keeps the fail-safe table even with `FailMode = open`.
    pub(crate) clean: bool,
    /// `FailMode = open`: a clean stop removes the fail-safe table too.
    pub(crate) fail_open: bool,
    /// The default VNET's configured routes installed in the kernel.
    lan_routes: Vec<LanRoute>,
}

impl Default for KernelUndo {
    fn default() -> Self {
        KernelUndo {
            steps: Vec::new(),
            fence: None,
            sets: None,
            letting_go: None,
            clean: true,
            fail_open: false,
            lan_routes: Vec::new(),
        }
    }
}

impl KernelUndo {
    /// Installs the fail-safe table (replacing one a run that died left):
    /// the tunnel fence, and the VNET fence when there are VNET interfaces.
    pub(crate) fn fence(&mut self, f: failsafe::Fence) -> Result<()> {
        failsafe::install(&f)?;
        tracing::info!("fail-safe: {}", f.summary());
        self.sets = Some(failsafe::Sets::installed(&f));
        self.fence = Some(f);
        Ok(())
    }

    /// After a live change's switch: the fence's elements that only the
    /// prefixes that left the tunnel needed are removed on a thread of
    /// their own, off the change's time (an nft deletion waits for an RCU
    /// grace period, 10-25 ms). Until then those prefixes are refused,
    /// never sent in clear. The next change, and stop, wait for it first
    /// ([`Self::settle`]).
    pub(crate) fn let_go(&mut self) {
        self.settle();
        let Some(script) = self.sets.as_mut().and_then(|s| s.tidy()) else {
            return;
        };
        let job = move || match failsafe::nft(&script) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("fail-safe: removing prefixes no longer tunnelled from the fence: {e}");
                false
            }
        };
        match std::thread::Builder::new().name("subway-let-go".into()).spawn(job) {
            Ok(t) => self.letting_go = Some(t),
            Err(e) => {
                tracing::warn!("no thread to tidy the fence ({e}): the next change replaces its sets");
                if let Some(s) = &mut self.sets {
                    s.lost();
                }
            }
        }
    }

    /// Waits for the last change's fence tidy.
    pub(crate) fn settle(&mut self) {
        if let Some(t) = self.letting_go.take()
            && !t.join().unwrap_or(false)
            && let Some(s) = &mut self.sets
        {
            s.lost();
        }
    }

    /// Turns a sysctl of one interface on, to be restored on stop.
    pub(crate) fn sysctl_on(&mut self, path: String, what: &str) -> Result<()> {
        let old = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {path}"), e))?
            .trim()
            .to_string();
        if old == "1" {
            return Ok(());
        }
        std::fs::write(&path, "1").map_err(|e| Error::io(format!("setting {path} to 1 ({what})"), e))?;
        tracing::info!("{what}: set {} to 1 (was {old}; restored on stop)", sysctl_name(&path));
        self.steps.push(Undo::Sysctl(path, old));
        Ok(())
    }

    /// IPv4 and IPv6 forwarding for packets that arrive on `ifname`. IPv6
    /// has had a per-interface switch (`force_forwarding`) since Linux
    /// 6.17; before that only the box-wide one exists, and it is used.
    pub(crate) fn forwarding(&mut self, ifname: &str, is_uplink: bool) -> Result<()> {
        let what = format!("LAN {ifname}{}", if is_uplink { " (also the uplink)" } else { "" });
        self.sysctl_on(format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"), &what)?;
        let v6 = format!("/proc/sys/net/ipv6/conf/{ifname}/force_forwarding");
        if std::path::Path::new(&v6).exists() {
            self.sysctl_on(v6, &what)
        } else if std::path::Path::new(&format!("/proc/sys/net/ipv6/conf/{ifname}")).exists() {
            self.sysctl_on(
                "/proc/sys/net/ipv6/conf/all/forwarding".into(),
                "this kernel has no per-interface IPv6 forwarding (force_forwarding, Linux 6.17)",
            )
        } else {
            Ok(())
        }
    }

    /// Takes a non-default VNET's connected prefixes out of the main table,
    /// so that the kernel's own traffic and routing never use them.
    pub(crate) fn isolate(&mut self, nl: &mut Netlink, port: &Port) -> Result<()> {
        let addrs = nl
            .addresses(port.ifindex)
            .map_err(|e| Error::io(format!("addresses of {}", port.name), e))?;
        for a in &addrs {
            let fam = if a.addr().is_ipv4() { "-4" } else { "-6" };
            let (net, dev, src) = (a.trunc().to_string(), port.name.clone(), a.addr().to_string());
            let args = [
                fam, "route", "del", &net, "dev", &dev, "proto", "kernel", "table", "main",
            ];
            let ok = std::process::Command::new("ip")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                tracing::info!("VNET interface {dev}: removed the kernel's route {net} from the main table");
            }
            // Restored on stop even when it was already gone (a run that
            // died before restoring it); appended, because another
            // interface may have the same prefix.
            self.steps.push(Undo::Cmd(
                [
                    "ip", fam, "route", "append", &net, "dev", &dev, "proto", "kernel", "scope", "link", "src", &src,
                ]
                .map(String::from)
                .to_vec(),
            ));
        }
        Ok(())
    }

    pub(crate) fn run(&mut self) {
        self.lan_routes_prune(&[]);
        for step in self.steps.drain(..).rev() {
            match step {
                Undo::Cmd(c) => {
                    let _ = std::process::Command::new(&c[0]).args(&c[1..]).output();
                }
                Undo::Sysctl(path, old) => {
                    let _ = std::fs::write(&path, old);
                }
            }
        }
        self.settle();
        if let Some(f) = self.fence.take() {
            if self.clean && self.fail_open {
                if let Err(e) = failsafe::remove(&f.table) {
                    tracing::warn!("removing nft table inet {}: {e}", f.table);
                }
            } else {
                tracing::warn!(
                    "fail-safe: leaving nft table inet {} in place: tunnelled prefixes stay refused \
                     (and VNET interfaces fenced off) until the next start or `subway down`",
                    f.table
                );
            }
        }
    }
}

impl Drop for KernelUndo {
    fn drop(&mut self) {
        self.run();
    }
}

/// `ip route {replace|del} PREFIX dev TUN` for every prefix, over
/// rtnetlink, hundreds per send ([`Netlink::dev_routes`]): the kernel's
/// route to a default-VNET peer prefix goes to the control thread, never
/// out in clear. `force` goes on past failures; `events` (ignoring the
/// TUN's routes) absorbs the notifications as they come.
pub(crate) fn kernel_routes(
    netlink: &mut crate::netlink::Netlink,
    add: bool,
    nets: &[IpNet],
    tun: &str,
    force: bool,
    events: Option<&mut crate::netlink::RoutingEvents>,
) -> Result<()> {
    if nets.is_empty() {
        return Ok(());
    }
    let op = if add { "replace" } else { "del" };
    let fail = |e: std::io::Error| Error::Kernel(format!("ip route {op} ... dev {tun} ({} prefixes): {e}", nets.len()));
    let name = std::ffi::CString::new(tun).map_err(|_| Error::Kernel(format!("{tun}: a NUL in the name")))?;
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(Error::Kernel(format!("ip route {op} ... dev {tun}: {tun} is gone")));
    }
    netlink.dev_routes(add, nets, ifindex, force, events).map_err(fail)
}

/// Runs `ip -batch` on `script` (one command per line); an error carries
/// ip's own message.
pub fn ip_batch(script: &str, force: bool) -> std::result::Result<(), String> {
    use std::io::Write;
    if script.is_empty() {
        return Ok(());
    }
    let mut args = vec!["-batch", "-"];
    if force {
        args.insert(0, "-force");
    }
    let mut child = std::process::Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip -batch: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running ip -batch: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

/// A default-VNET `Route` as the kernel's route: prefix, LAN, routers.
pub(crate) type LanRoute = (IpNet, String, Vec<std::net::IpAddr>);

/// `ip route` arguments for a LAN route: `P via H dev D`, or one
/// `nexthop via H dev D` per router (the kernel's ECMP).
fn lan_route_args((net, dev, hops): &LanRoute) -> String {
    match hops.as_slice() {
        [h] => format!("{} via {h} dev {dev}", net.trunc()),
        _ => {
            let nh: Vec<String> = hops.iter().map(|h| format!("nexthop via {h} dev {dev}")).collect();
            format!("{} {}", net.trunc(), nh.join(" "))
        }
    }
}

impl KernelUndo {
    /// The default VNET's configured routes in the kernel's main table too:
    /// its slow path is the kernel, which must send the first packets (and
    /// anything the workers hand it) through the same router. Routes new or
    /// changed in `wanted` are replaced before a switch; [`Self::lan_routes_prune`]
    /// removes the others after it. All are removed on stop.
    pub(crate) fn lan_routes_add(&mut self, wanted: &[LanRoute]) -> Result<()> {
        let new: Vec<&LanRoute> = wanted.iter().filter(|r| !self.lan_routes.contains(r)).collect();
        let script: String = new
            .iter()
            .map(|r| format!("route replace {}\n", lan_route_args(r)))
            .collect();
        // Recorded first: a batch that fails half-way has added some, and
        // what is recorded is removed by the next prune or on stop.
        for r in &new {
            self.lan_routes.push((*r).clone());
        }
        ip_batch(&script, false).map_err(|e| {
            Error::Kernel(format!(
                "adding the default VNET's configured routes to the kernel ({}): {e}",
                script.trim().replace('\n', "; ")
            ))
        })?;
        for r in new {
            tracing::info!(
                "kernel route {} (a configured Route of the default VNET)",
                lan_route_args(r)
            );
        }
        Ok(())
    }

    /// Removes the configured routes no longer in `wanted` (logged, never
    /// an error: it runs after a switch).
    pub(crate) fn lan_routes_prune(&mut self, wanted: &[LanRoute]) {
        // A route replaced by a changed one (same prefix) is not removed:
        // `replace` took its place.
        let gone = |r: &LanRoute| !wanted.iter().any(|w| w.0 == r.0);
        let script: String = self
            .lan_routes
            .iter()
            .filter(|r| gone(r))
            .map(|r| format!("route del {}\n", lan_route_args(r)))
            .collect();
        if let Err(e) = ip_batch(&script, true) {
            tracing::warn!("removing configured routes from the kernel: {e}");
        }
        self.lan_routes.retain(|r| wanted.contains(r));
    }
}

/// `net.ipv4.conf.lan0.forwarding` for `/proc/sys/net/ipv4/conf/lan0/forwarding`.
pub(crate) fn sysctl_name(path: &str) -> String {
    path.trim_start_matches("/proc/sys/").replace('/', ".")
}

/// The slow-path TUN forwards what the workers and the control thread
/// hand the kernel. Its reverse-path check is off (`SlowPath::create`):
/// packets from LAN hosts come in through it (too big for the tunnel, no
/// session yet), and even a loose check loses the ICMP errors the kernel
/// owes them. The kernel applies the stricter of `all` and the interface's
/// value, so a box-wide `all` setting is named in a warning. The TUN is
/// created anew each start: nothing is restored.
pub(crate) fn tun_sysctls(tun: &str) -> Result<()> {
    let mut v6 = format!("/proc/sys/net/ipv6/conf/{tun}/force_forwarding");
    if !std::path::Path::new(&v6).exists() {
        v6 = format!("/proc/sys/net/ipv6/conf/{tun}/forwarding");
    }
    for (path, value) in [(format!("/proc/sys/net/ipv4/conf/{tun}/forwarding"), "1"), (v6, "1")] {
        if std::path::Path::new(&path).exists() {
            std::fs::write(&path, value)
                .map_err(|e| Error::io(format!("setting {} to {value}", sysctl_name(&path)), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tun_names_fit_and_differ() {
        assert_eq!(super::tun_name("site-a"), "sw-site-a");
        let (a, b) = (super::tun_name("gateway-site-a"), super::tun_name("gateway-site-b"));
        assert_ne!(a, b);
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
    }
}
