//! The configuration file's keys, written once: the README's table and
//! subway.conf(5) are both rendered from [`KEYS`] (a unit test holds the
//! README to it).

/// (section, keys, meaning), as Markdown cells; an empty section cell
/// continues the section above.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("`[Interface]`", "`PrivateKey`, `ListenPort`", "as in wg-quick"),
    (
        "",
        "`Uplink`",
        "interface toward the peers (required with peers; may be a `[Lan]` interface: one-armed)",
    ),
    (
        "",
        "`FailMode`",
        "`closed` (default): the fail-safe table stays after a clean stop too; `open`: a clean stop removes it",
    ),
    (
        "",
        "`Address`, `DNS`, `MTU`, `Table`, `Pre/PostUp/Down`, `SaveConfig`, `FwMark`",
        "accepted with a warning, unused",
    ),
    ("`[Lan]` (one or more)", "`Interface`", "a LAN-facing interface"),
    (
        "",
        "`Subnets`",
        "prefixes on this link, and behind routers on it; default: the prefixes of its addresses. In the default VNET, a kernel route through a router on this LAN (`ip route add 10.1.5.0/24 via 10.1.0.254`, or a routing daemon's) whose prefix is inside `Subnets` is followed by the fast path, kept in step by netlink events",
    ),
    ("", "`VNet`", "routing domain, default `default`"),
    (
        "",
        "`Route`",
        "`Route = 10.1.5.0/24 via 10.1.0.254`: a prefix behind a router on this LAN (repeatable; several routers after `via`: ECMP, each flow on one); the router must be on the LAN's `Subnets`, the prefix must not overlap a peer's AllowedIPs in the VNET; changed live by `subway reload`. In the default VNET subway also adds it to the kernel's main table (the kernel is that VNET's slow path) and removes it on stop",
    ),
    (
        "`[Peer]`",
        "`PublicKey`, `PresharedKey`, `Endpoint`, `AllowedIPs`, `PersistentKeepalive`",
        "as in wg-quick; AllowedIPs are the routes to the peer",
    ),
    (
        "",
        "`VNet`",
        "routing domain, default `default`; must match the VNET of the LANs it serves",
    ),
    (
        "",
        "`Priority`, `Probe`, `ProbeInterval`, `ProbeMisses`",
        "route groups: one prefix on several peers (see \"Route groups\")",
    ),
    (
        "`[Policy]` (one per VNET)",
        "`VNet`, `Default`",
        "the VNET it guards (default `default`); what no rule matches gets: `allow` (default) or `deny`",
    ),
    (
        "",
        "`Rule`",
        "`Rule = allow in lan0 from 10.1.0.0/24 to 10.2.0.0/24 proto tcp port 443` (repeatable, first match decides): `allow`/`deny`, then any of `in IFACE` or `in peer KEY`, `from PREFIX`, `to PREFIX`, `proto tcp/udp/icmp/icmpv6/any`, `port N[-M]`; replies to allowed flows and ICMP errors about them pass (see \"Policies\")",
    ),
    (
        "`[HA]`",
        "`VirtualAddress`",
        "the addresses keepalived moves between two boxes that share this config; this box is active while it holds one (see \"Two boxes\")",
    ),
    (
        "`[Export]`",
        "`Table`, `Protocol`, `DrainSeconds`",
        "the kernel table of what this box can serve, for BIRD (see \"Active/active\")",
    ),
    (
        "`[Metrics]`",
        "`Listen`",
        "Prometheus text on `ADDRESS:PORT/metrics` (default `127.0.0.1:9586` when the section is present)",
    ),
    (
        "`[Tuning]`",
        "`Queues`",
        "RX queues to serve, e.g. `0-3` (default: all)",
    ),
    (
        "",
        "`Cores`",
        "cores for the workers, round-robin, e.g. `2,3` (default: all)",
    ),
    (
        "",
        "`SourcePorts`",
        "send each inner flow from one of ListenPort .. ListenPort + N - 1 so the peer's RSS spreads one tunnel over N queues; those ports receive too (default 1, at most 32)",
    ),
    ("", "`BatchSize`", "frames per ring operation (default 64)"),
    (
        "",
        "`RingSize`",
        "RX/TX/fill/completion ring size, power of two (default 2048)",
    ),
    ("", "`FrameSize`", "UMEM frame size, 2048 or 4096 (default 2048)"),
    (
        "",
        "`XskMode`",
        "`auto` (zero-copy if the driver can), `copy`, `zero-copy`",
    ),
    ("", "`XdpMode`", "`auto` (driver, else generic), `driver`, `generic`"),
    ("", "`NeedWakeup`", "sleep in poll() when idle (default true)"),
    (
        "",
        "`BusyPoll`",
        "SO_PREFER_BUSY_POLL and spin instead of sleeping (default false)",
    ),
    (
        "",
        "`IdleSpin`",
        "empty polls before sleeping (default 512; 0 on a core shared with the NIC's softirq)",
    ),
    (
        "",
        "`MaxFlows`, `FlowTimeoutTcp`, `FlowTimeoutUdp`, `FlowTimeoutOther`",
        "[Policy]'s flow table: flows remembered (default 262144, 16 B each) and seconds an idle flow lives (3600, 120, 30; a TCP flow that saw FIN or RST: 10); taken at start",
    ),
];

/// The table as it stands in the README.
#[cfg(test)]
pub fn markdown() -> String {
    let mut s = String::from("| section | key | meaning |\n|---|---|---|\n");
    for (section, keys, meaning) in KEYS {
        let section = if section.is_empty() { "" } else { section };
        s += &format!("| {section} | {keys} | {meaning} |\n").replace("|  |", "| |");
    }
    s
}

/// Markdown inline code as roff bold, and roff's special characters escaped.
fn roff(md: &str) -> String {
    let mut out = String::new();
    let mut bold = false;
    for ch in md.chars() {
        match ch {
            '`' => {
                out += if bold { "\\fR" } else { "\\fB" };
                bold = !bold;
            }
            '\\' => out += "\\e",
            '-' => out += "\\-",
            c => out.push(c),
        }
    }
    out
}

/// subway.conf(5).
pub fn man_page(version: &str) -> String {
    let mut s = format!(
        ".TH SUBWAY.CONF 5 \"\" \"subway {version}\" \"File Formats\"\n\
         .SH NAME\nsubway.conf \\- configuration of a subway WireGuard gateway instance\n\
         .SH SYNOPSIS\n/etc/subway/\\fINAME\\fR.conf\n\
         .SH DESCRIPTION\n\
         An INI file in the wg\\-quick style: sections in brackets, \\fBKey = Value\\fR lines, \\fB#\\fR comments. \
         The instance name is the file's stem. A wg\\-quick file's [Interface] and [Peer] sections read as they are; \
         subway adds [Lan], [HA], [Export], [Tuning] and [Metrics]. \
         Bad input is refused with the file, the line and what to do (\\fBsubway check \\-\\-config\\fR \\fIFILE\\fR).\n\
         .SH KEYS\n"
    );
    for (section, keys, meaning) in KEYS {
        if !section.is_empty() {
            s += &format!(".SS {}\n", roff(section));
        }
        s += &format!(".TP\n{}\n{}\n", roff(keys), roff(meaning));
    }
    s += ".SH SEE ALSO\nsubway(8), wg(8), keepalived.conf(5), bird(8)\n";
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_readme_table_is_this_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table = super::markdown();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from control/src/config/doc.rs; it should read:\n{table}"
        );
    }

    #[test]
    fn the_man_page_has_every_key_in_roff() {
        let page = super::man_page("0.0.0");
        assert!(page.starts_with(".TH SUBWAY.CONF 5"));
        for (_, keys, _) in super::KEYS {
            let first = keys.split('`').nth(1).unwrap_or(keys);
            assert!(page.contains(&first.replace('-', "\\-")), "{first} missing");
        }
        assert!(!page.contains('`'), "markdown left in the page");
    }
}
