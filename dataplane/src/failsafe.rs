//! The fail-safe state subway leaves in the kernel: one nftables table per
//! instance, `inet subway_NAME`, that outlives the process.
//!
//! It holds two fences. The tunnel fence refuses (ICMP administratively
//! prohibited, counted) every packet for a default-VNET peer prefix that
//! would leave any interface but the instance's slow-path TUN: while
//! subway runs the kernel routes those prefixes into the TUN, and when it
//! is down (crashed, stopped, not yet started at boot) the kernel would
//! otherwise send them in clear along its default route. The VNET fence
//! keeps non-default VNETs' interfaces out of the kernel's single routing
//! table. The table is installed before XDP and the TUN at start, replaced
//! atomically, and removed only by a clean stop with `FailMode = open` or
//! by `subway down`.
//!
//! What goes into the table is planned by pure functions (unit-tested);
//! [`install`], [`Sets`] (live changes) and
//! [`remove`] run `nft`.

use crate::error::{Error, Result};
use crate::fib::{Route, addr_num};
use ipnet::IpNet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The named counter of packets the tunnel fence refused.
pub const REFUSED_COUNTER: &str = "tunnel_refused";

/// The nftables table of an instance: `subway_` and its name.
pub fn table_name(instance: &str) -> String {
    let clean: String = instance
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("subway_{clean}")
}

/// What the table of one instance holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    pub table: String,
    /// The slow-path TUN: the only way out for tunnelled prefixes.
    pub tun: String,
    /// The WireGuard listen port: the instance's own handshakes and
    /// keepalives may go to an endpoint inside a peer prefix (0: none).
    pub listen_port: u16,
    /// Default-VNET destinations that only a peer serves (see [`tunnelled`]).
    pub tunnelled: Vec<IpNet>,
    /// Interfaces of non-default VNETs, fenced off from the kernel.
    pub vnet_ifaces: Vec<String>,
    /// The gateway's addresses that exist only in non-default VNETs.
    pub vnet_only_addrs: Vec<IpAddr>,
}

/// The default-VNET address space whose longest-prefix match in `routes`
/// is a peer: each peer prefix minus the more specific LAN and local
/// prefixes inside it (which may hold more specific peer prefixes again;
/// those are in the result through their own entry). Nested results are
/// folded into the wider one, so no two returned prefixes overlap.
pub fn tunnelled(routes: &[Route]) -> Vec<IpNet> {
    Pieces::build(routes).folded()
}

/// A piece of the fence as plain numbers: (IPv6, first address, length).
type Piece = (bool, u128, u8);

/// A piece's last address.
fn last((v6, first, len): Piece) -> u128 {
    first + u128::MAX.checked_shr(len as u32 + if v6 { 0 } else { 96 }).unwrap_or(0)
}

/// Whether piece `inner` lies inside piece `outer` (or is it).
fn inside(inner: Piece, outer: Piece) -> bool {
    inner.0 == outer.0 && outer.1 <= inner.1 && last(inner) <= last(outer)
}

/// A prefix as a piece.
fn piece_of(n: &IpNet) -> Piece {
    (n.addr().is_ipv6(), addr_num(n.network()), n.prefix_len())
}

/// [`tunnelled`] before folding: each default-VNET peer prefix minus the
/// LAN and local prefixes inside it, sorted, with how many routes gave
/// each piece, and the folded result kept with them. A live change of
/// peers alone (the LAN and local prefixes, the holes, stay) adds and
/// removes its own prefixes' pieces and refolds only where they lie,
/// instead of going over 100,000 routes again.
#[derive(Clone, Debug, Default)]
pub struct Pieces {
    pieces: Vec<(Piece, u32)>,
    /// The default VNET's LAN and local prefixes.
    holes: Vec<IpNet>,
    /// The pieces not inside another, in the pieces' order ([`Pieces::folded`]).
    folded: Vec<IpNet>,
}

impl Pieces {
    pub fn build(routes: &[Route]) -> Pieces {
        let default = || routes.iter().filter(|r| r.vnet == 0);
        // The LAN and local prefixes (few), listed once, not once per peer prefix.
        let holes: Vec<IpNet> = default()
            .filter(|r| !r.target.is_tunnel())
            .map(|r| r.prefix.trunc())
            .collect();
        let mut this = Pieces {
            pieces: Vec::with_capacity(routes.len()),
            holes,
            folded: Vec::new(),
        };
        let mut keyed = Vec::with_capacity(routes.len());
        for r in default().filter(|r| r.target.is_tunnel()) {
            this.of(r.prefix, &mut keyed);
        }
        // Sorted as plain numbers (no key worked out per comparison), by a
        // sort that finds runs: the FIB lists its routes mostly in order.
        keyed.sort();
        for k in keyed {
            match this.pieces.last_mut() {
                Some((p, n)) if *p == k => *n += 1,
                _ => this.pieces.push((k, 1)),
            }
        }
        this.folded = fold(this.pieces.iter().map(|(p, _)| *p));
        this
    }

    /// The pieces of the peer prefix `p`, appended to `out`.
    fn of(&self, p: IpNet, out: &mut Vec<Piece>) {
        let p = p.trunc();
        let inside = |q: &&IpNet| q.prefix_len() > p.prefix_len() && p.contains(*q);
        if !self.holes.iter().any(|q| inside(&q)) {
            out.push(piece_of(&p));
            return;
        }
        let holes: Vec<IpNet> = self.holes.iter().filter(inside).copied().collect();
        let mut pieces = Vec::new();
        subtract(p, &holes, &mut pieces);
        out.extend(pieces.iter().map(piece_of));
    }

    /// A default-VNET peer prefix added.
    pub fn add(&mut self, p: IpNet) {
        let mut new = Vec::new();
        self.of(p, &mut new);
        for k in new {
            match self.pieces.binary_search_by(|(q, _)| q.cmp(&k)) {
                Ok(i) => self.pieces[i].1 += 1,
                Err(i) => {
                    self.pieces.insert(i, (k, 1));
                    self.fold_in(k);
                }
            }
        }
    }

    /// A default-VNET peer prefix removed.
    pub fn remove(&mut self, p: IpNet) {
        let mut gone = Vec::new();
        self.of(p, &mut gone);
        for k in gone {
            if let Ok(i) = self.pieces.binary_search_by(|(q, _)| q.cmp(&k)) {
                self.pieces[i].1 -= 1;
                if self.pieces[i].1 == 0 {
                    self.pieces.remove(i);
                    self.fold_out(k);
                }
            }
        }
    }

    /// Where `k` is or would go in the folded list.
    fn folded_at(&self, k: Piece) -> std::result::Result<usize, usize> {
        self.folded.binary_search_by(|n| piece_of(n).cmp(&k))
    }

    /// A new piece `k` in the folded list: nothing if a wider one holds it
    /// (only the one just before it can: the folded never overlap), else
    /// it goes in and takes the place of those inside it.
    fn fold_in(&mut self, k: Piece) {
        let Err(i) = self.folded_at(k) else { return };
        if i > 0 && inside(k, piece_of(&self.folded[i - 1])) {
            return;
        }
        let end = i + self.folded[i..].iter().take_while(|n| inside(piece_of(n), k)).count();
        self.folded.splice(i..end, [to_net(k)]);
    }

    /// A piece `k` gone: if it was folded, the pieces inside it that no
    /// other holds come back in its place.
    fn fold_out(&mut self, k: Piece) {
        let Ok(i) = self.folded_at(k) else { return };
        let from = self.pieces.partition_point(|(p, _)| *p < k);
        let within = self.pieces[from..]
            .iter()
            .map(|(p, _)| *p)
            .take_while(|p| inside(*p, k));
        let back = fold(within);
        self.folded.splice(i..i + 1, back);
    }

    /// The pieces with those inside another folded into it: sorted, none
    /// overlapping.
    pub fn folded(&self) -> Vec<IpNet> {
        self.folded.clone()
    }
}

/// A piece as a prefix.
fn to_net((v6, first, len): Piece) -> IpNet {
    IpNet::new(addr(first, !v6), len).expect("the length of a prefix")
}

/// Sorted pieces with those inside another dropped: by start address, the
/// widest first, a piece inside an earlier one is inside the last one kept
/// (the kept never overlap).
fn fold(pieces: impl Iterator<Item = Piece>) -> Vec<IpNet> {
    let mut folded: Vec<IpNet> = Vec::new();
    let mut kept: Option<Piece> = None;
    for p in pieces {
        if kept.is_some_and(|k| inside(p, k)) {
            continue;
        }
        kept = Some(p);
        folded.push(to_net(p));
    }
    folded
}

/// `net` minus every prefix in `holes` (each inside `net`), as prefixes:
/// halves of `net` that touch no hole are kept whole.
fn subtract(net: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.iter().any(|h| h.contains(&net)) {
        return;
    }
    if !holes.iter().any(|h| net.contains(h)) {
        out.push(net);
        return;
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return;
    };
    for half in halves {
        let inside: Vec<IpNet> = holes
            .iter()
            .filter(|h| half.contains(*h) || h.contains(&half))
            .copied()
            .collect();
        subtract(half, &inside, out);
    }
}

fn quoted(names: &[String]) -> String {
    names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
}

/// A number from [`addr_num`] as the address again.
fn addr(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::from(std::net::Ipv4Addr::from(n as u32))
    } else {
        IpAddr::from(std::net::Ipv6Addr::from(n))
    }
}

/// `nets` of one family (from [`tunnelled`]: sorted, none overlapping) as
/// inclusive address ranges, adjacent ones merged: 100,000 consecutive
/// /28s are one set element, so nft's work on a reload follows the shape
/// of the address space, not the number of routes.
fn ranges(nets: &[IpNet], v4: bool) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for n in nets.iter().filter(|n| n.addr().is_ipv4() == v4) {
        let (first, last) = (addr_num(n.network()), addr_num(n.broadcast()));
        match out.last_mut() {
            Some(r) if r.1.checked_add(1) == Some(first) => r.1 = last,
            _ => out.push((first, last)),
        }
    }
    out
}

/// Ranges as nft set elements.
fn range_elements(ranges: &[(u128, u128)], v4: bool) -> String {
    let bits = if v4 { 32 } else { 128 };
    ranges
        .iter()
        .map(|&(first, last)| {
            // A range that is one prefix is written as that prefix.
            let size = last - first;
            let len = bits - (128 - size.leading_zeros());
            match IpNet::new(addr(first, v4), len as u8) {
                Ok(p) if size.wrapping_add(1).is_power_of_two() && addr_num(p.network()) == first => p.to_string(),
                _ if size == u128::MAX => IpNet::new(addr(0, v4), 0).map(|p| p.to_string()).unwrap_or_default(),
                _ => format!("{}-{}", addr(first, v4), addr(last, v4)),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `op` (add, delete) of `ranges` in one of the two sets, as one statement.
fn element_stmt(op: &str, table: &str, set: &str, ranges: &[(u128, u128)], v4: bool) -> String {
    format!("{op} element inet {table} {set} {{ {} }}\n", range_elements(ranges, v4))
}

/// The two sets, IPv4 then IPv6.
const SETS: [(&str, bool); 2] = [("tunnel4", true), ("tunnel6", false)];

/// What the kernel's sets hold, element by element: inclusive ranges,
/// sorted, none overlapping (IPv4 then IPv6). The sets have no auto-merge,
/// so the kernel holds exactly the elements subway gave it, and adding one
/// never deletes another: a deletion waits for an RCU grace period (10-25
/// ms) before nft returns, an addition does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held([Vec<(u128, u128)>; 2]);

impl Held {
    /// `nets` (from [`tunnelled`]) as the merged ranges that
    /// [`Fence::ruleset`] and [`Sets`] write.
    pub fn of(nets: &[IpNet]) -> Held {
        Held(SETS.map(|(_, v4)| ranges(nets, v4)))
    }

    /// Additions only: the elements that make the sets refuse all of
    /// `want` (what they hold beyond it stays), what they hold after, and
    /// the added elements alone. None if they already refuse all of it.
    pub fn cover(&self, table: &str, want: &Held) -> Option<(String, Held, Held)> {
        let mut script = String::new();
        let mut after = self.clone();
        let mut added = Held::default();
        for (i, (set, v4)) in SETS.into_iter().enumerate() {
            let new = uncovered(&want.0[i], &self.0[i]);
            if new.is_empty() {
                continue;
            }
            script += &element_stmt("add", table, set, &new, v4);
            after.0[i].extend_from_slice(&new);
            after.0[i].sort_unstable();
            added.0[i] = new;
        }
        (!script.is_empty()).then_some((script, after, added))
    }

    /// The ranges of both, overlapping and adjacent ones merged.
    fn union(&self, other: &Held) -> Held {
        let mut out = Held::default();
        for (i, o) in out.0.iter_mut().enumerate() {
            let mut all: Vec<(u128, u128)> = self.0[i].iter().chain(&other.0[i]).copied().collect();
            all.sort_unstable();
            for (first, last) in all {
                match o.last_mut() {
                    Some(r) if first <= r.1.saturating_add(1) => r.1 = r.1.max(last),
                    _ => o.push((first, last)),
                }
            }
        }
        out
    }

    /// The two sets' element statements (nothing for an empty family).
    fn elements(&self, table: &str) -> String {
        self.0
            .iter()
            .zip(SETS)
            .filter(|(r, _)| !r.is_empty())
            .map(|(r, (set, v4))| element_stmt("add", table, set, r, v4))
            .collect()
    }

    /// The one transaction that makes the sets hold exactly these
    /// elements, whatever they held (the rules and the counter stay).
    fn replace_script(&self, table: &str) -> String {
        format!(
            "flush set inet {table} tunnel4\nflush set inet {table} tunnel6\n{}",
            self.elements(table)
        )
    }

    /// These elements without those of `added` (sorted, all held).
    fn without(&self, added: &Held) -> Held {
        let mut out = self.clone();
        for (held, gone) in out.0.iter_mut().zip(&added.0) {
            held.retain(|r| gone.binary_search(r).is_err());
        }
        out
    }

    /// The one transaction that leaves the sets holding exactly `want`:
    /// the elements it does not have deleted, its own added (they may
    /// overlap the deleted ones: one transaction). None if they do.
    pub fn tidy(&self, table: &str, want: &Held) -> Option<String> {
        let mut del = String::new();
        let mut add = String::new();
        for (i, (set, v4)) in SETS.into_iter().enumerate() {
            let (was, now) = (&self.0[i], &want.0[i]);
            let gone: Vec<(u128, u128)> = was.iter().filter(|r| now.binary_search(r).is_err()).copied().collect();
            let new: Vec<(u128, u128)> = now.iter().filter(|r| was.binary_search(r).is_err()).copied().collect();
            if !gone.is_empty() {
                del += &element_stmt("delete", table, set, &gone, v4);
            }
            if !new.is_empty() {
                add += &element_stmt("add", table, set, &new, v4);
            }
        }
        (!del.is_empty() || !add.is_empty()).then(|| del + &add)
    }
}

/// The parts of the ranges `want` that no range of `held` covers (both
/// sorted, none overlapping within each).
fn uncovered(want: &[(u128, u128)], held: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(first, last) in want {
        while j < held.len() && held[j].1 < first {
            j += 1;
        }
        // The first address of this range not yet accounted for.
        let mut at = Some(first);
        let mut k = j;
        while let Some(from) = at
            && k < held.len()
            && held[k].0 <= last
        {
            let (hf, hl) = held[k];
            if hf > from {
                out.push((from, hf - 1));
            }
            at = if hl >= last { None } else { Some(hl + 1) };
            k += 1;
        }
        if let Some(from) = at {
            out.push((from, last));
        }
        // The last held range looked at may reach into the next one.
        j = k.saturating_sub(1).max(j);
    }
    out
}

impl Fence {
    /// This fence with other tunnelled prefixes (the old ones not copied).
    pub fn with_tunnelled(&self, tunnelled: Vec<IpNet>) -> Fence {
        Fence {
            table: self.table.clone(),
            tun: self.tun.clone(),
            listen_port: self.listen_port,
            tunnelled,
            vnet_ifaces: self.vnet_ifaces.clone(),
            vnet_only_addrs: self.vnet_only_addrs.clone(),
        }
    }

    /// One line for logs and `subway fence`: what the table holds.
    pub fn summary(&self) -> String {
        let vnets = if self.vnet_ifaces.is_empty() {
            String::new()
        } else {
            format!(
                "; VNET interfaces {} fenced off from the kernel's routing",
                self.vnet_ifaces.join(", ")
            )
        };
        format!(
            "nft table inet {} refuses {} tunnelled prefix(es) anywhere but {}{vnets}",
            self.table,
            self.tunnelled.len(),
            self.tun
        )
    }

    /// The whole table as one `nft -f` transaction that replaces any table
    /// of the same name (left by a run that died) atomically.
    pub fn ruleset(&self) -> String {
        let t = &self.table;
        let tun = format!("\"{}\"", self.tun);
        let mut fwd = String::new();
        let mut input = String::new();
        let mut output = String::new();
        if !self.vnet_ifaces.is_empty() {
            let names = quoted(&self.vnet_ifaces);
            fwd += &format!("  iifname {{ {names} }} counter drop\n  oifname {{ {names} }} counter drop\n");
            input += &format!("  iifname {{ {names} }} meta l4proto != ipv6-icmp counter drop\n");
            output += &format!("  oifname {{ {names} }} meta l4proto != ipv6-icmp counter drop\n");
            // The kernel would accept a packet for any of its addresses on
            // any interface: VNET-only addresses are not reachable from
            // elsewhere.
            for (family, v4) in [("ip", true), ("ip6", false)] {
                let set: Vec<String> = self
                    .vnet_only_addrs
                    .iter()
                    .filter(|a| a.is_ipv4() == v4)
                    .map(|a| a.to_string())
                    .collect();
                if !set.is_empty() {
                    input += &format!(
                        "  {family} daddr {{ {} }} iifname != {{ {names} }} counter drop\n",
                        set.join(", ")
                    );
                }
            }
        }
        let refuse = format!(
            "  ip daddr @tunnel4 counter name {REFUSED_COUNTER} reject with icmpx admin-prohibited\n  \
             ip6 daddr @tunnel6 counter name {REFUSED_COUNTER} reject with icmpx admin-prohibited\n"
        );
        fwd += &format!("  oifname {tun} accept\n{refuse}");
        output += &format!("  oifname {tun} accept\n");
        if self.listen_port != 0 {
            output += &format!("  udp sport {} accept\n", self.listen_port);
        }
        output += &refuse;
        format!(
            "table inet {t} {{}}\ndelete table inet {t}\n\
             table inet {t} {{\n\
             counter {REFUSED_COUNTER} {{}}\n\
             set tunnel4 {{ type ipv4_addr; flags interval; }}\n\
             set tunnel6 {{ type ipv6_addr; flags interval; }}\n\
             chain forward {{ type filter hook forward priority -10; policy accept;\n{fwd} }}\n\
             chain input {{ type filter hook input priority -10; policy accept;\n{input} }}\n\
             chain output {{ type filter hook output priority -10; policy accept;\n{output} }}\n\
             }}\n{}",
            Held::of(&self.tunnelled).elements(t)
        )
    }
}

pub(crate) fn nft(script: &str) -> Result<()> {
    nft_start(script)?.wait()
}

/// An nft transaction under way: the process, its script written to it.
/// [`NftRun::wait`] gives nft's answer; until then the caller may do
/// other work (the process runs on another core).
#[derive(Debug)]
pub(crate) struct NftRun(std::process::Child);

/// Starts `nft -f -` on `script` without waiting for it.
pub(crate) fn nft_start(script: &str) -> Result<NftRun> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::io(
                "running nft (apt-get install nftables): the fail-safe fence needs it",
                e,
            )
        })?;
    // A short script fits the pipe: this returns at once. (A long one is
    // written as nft reads it; stdin closes when dropped here.)
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    Ok(NftRun(child))
}

impl NftRun {
    /// Waits for nft: an error carries its own message.
    pub(crate) fn wait(self) -> Result<()> {
        let out = self.0.wait_with_output().map_err(|e| Error::io("running nft", e))?;
        if !out.status.success() {
            return Err(Error::Kernel(format!(
                "nft refused the fail-safe table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// Installs (or atomically replaces) the instance's table.
pub fn install(f: &Fence) -> Result<()> {
    nft(&f.ruleset())
}

/// The tunnel fence's sets while subway runs. A change of the tunnelled
/// prefixes is two transactions: before the switch, [`Sets::cover_start`]
/// and [`Sets::cover_finish`] add what the new prefixes need (additions
/// only, a few milliseconds); after it, [`Sets::tidy`] gives the
/// transaction that deletes what is gone and merges what was added, which
/// the caller runs off the change's time (`host::KernelUndo::let_go`). In between the sets refuse a little
/// more than the tunnelled prefixes: a prefix that left the tunnel is
/// refused for those milliseconds, never sent in clear.
#[derive(Debug)]
pub struct Sets {
    table: String,
    /// What the sets hold (once the last tidy ran); None when that is
    /// unknown (nft refused a change): the next change replaces them whole.
    held: Option<Held>,
    /// What the last cover wants the sets to hold once tidied.
    want: Option<Held>,
}

/// A cover of the sets under way ([`Sets::cover_start`]).
#[derive(Debug)]
pub struct Covering {
    step: CoverStep,
    want: Held,
}

#[derive(Debug)]
enum CoverStep {
    /// The sets already refuse all of it.
    Covered,
    /// nft adds what they lack; then they hold this (and the additions).
    Adding(NftRun, Held, Held),
    /// What they hold is unknown: replaced whole when the cover finishes.
    Replace,
}

impl Sets {
    /// The sets of `f` as [`install`] wrote them.
    pub fn installed(f: &Fence) -> Sets {
        Sets {
            table: f.table.clone(),
            held: Some(Held::of(&f.tunnelled)),
            want: None,
        }
    }

    /// Makes the sets refuse every prefix of `f` before the switch, in two
    /// steps: this starts nft on the additions (only additions) and
    /// returns while it runs; [`Sets::cover_finish`] waits for it. A live
    /// change does its other work before the switch in between.
    pub fn cover_start(&mut self, f: &Fence) -> Covering {
        let want = Held::of(&f.tunnelled);
        let step = match self.held.as_ref().map(|h| h.cover(&self.table, &want)) {
            Some(None) => CoverStep::Covered,
            Some(Some((script, after, added))) => match nft_start(&script) {
                Ok(run) => CoverStep::Adding(run, after, added),
                Err(e) => {
                    tracing::debug!("the fence's additions did not start ({e}): replacing the sets");
                    CoverStep::Replace
                }
            },
            None => CoverStep::Replace,
        };
        Covering { step, want }
    }

    /// Waits for the additions [`Sets::cover_start`] started. If nft
    /// refused them (or what the sets hold is unknown), replaces the sets
    /// in one transaction with the running fence `old` and the new one
    /// together: until the switch the running prefixes stay refused too;
    /// the tidy after it leaves the new ones alone.
    pub fn cover_finish(&mut self, c: Covering, old: &Fence) -> Result<()> {
        let covered = match c.step {
            CoverStep::Covered => true,
            CoverStep::Adding(run, after, _) => match run.wait() {
                Ok(()) => {
                    self.held = Some(after);
                    true
                }
                Err(e) => {
                    tracing::debug!("the fence's sets were not as expected ({e}): replacing them");
                    false
                }
            },
            CoverStep::Replace => false,
        };
        if !covered {
            self.held = None;
            let both = Held::of(&old.tunnelled).union(&c.want);
            nft(&both.replace_script(&self.table))?;
            self.held = Some(both);
        }
        self.want = Some(c.want);
        Ok(())
    }

    /// The change that started `c` failed before the switch: waits for
    /// nft and replaces nothing. Additions that went in are to be taken
    /// out again (true: run the tidy, [`host::KernelUndo::let_go`]); until
    /// then the sets refuse a little more, never less.
    pub fn cover_abandon(&mut self, c: Covering) -> bool {
        match c.step {
            CoverStep::Adding(run, after, added) => match run.wait() {
                Ok(()) => {
                    self.want = Some(after.without(&added));
                    self.held = Some(after);
                    true
                }
                // One transaction: nothing changed, but the sets did not
                // hold what was thought; the next change replaces them.
                Err(_) => {
                    self.held = None;
                    false
                }
            },
            CoverStep::Covered | CoverStep::Replace => false,
        }
    }

    /// After the switch: the transaction that leaves the sets holding
    /// exactly what the last cover wanted (None if they do).
    /// The sets are taken to hold that from now on; if the transaction
    /// fails, [`Sets::lost`].
    pub fn tidy(&mut self) -> Option<String> {
        let (Some(want), Some(held)) = (self.want.take(), self.held.as_ref()) else {
            return None;
        };
        let script = held.tidy(&self.table, &want)?;
        self.held = Some(want);
        Some(script)
    }

    /// A tidy failed: what the sets hold is unknown, and the next change
    /// replaces them whole.
    pub fn lost(&mut self) {
        self.held = None;
    }
}

/// Removes the instance's table; `Ok(false)` if there was none.
pub fn remove(table: &str) -> Result<bool> {
    if !exists(table) {
        return Ok(false);
    }
    nft(&format!("delete table inet {table}\n"))?;
    Ok(true)
}

/// Whether the instance's table is in the kernel.
pub fn exists(table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Packets the tunnel fence has refused since the table was installed.
pub fn refused(table: &str) -> Option<u64> {
    let out = Command::new("nft")
        .args(["list", "counter", "inet", table, REFUSED_COUNTER])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let after = text.split("packets ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::{Fib, Target};

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn elements(nets: &[IpNet], v4: bool) -> String {
        range_elements(&ranges(nets, v4), v4)
    }

    fn held(nets: &[&str]) -> Held {
        Held::of(&nets.iter().map(|s| n(s)).collect::<Vec<_>>())
    }

    #[test]
    fn a_change_adds_before_the_switch_and_deletes_after() {
        let old = held(&[
            "10.0.0.0/8",
            "100.64.0.0/28",
            "100.64.0.16/28",
            "100.64.0.32/27",
            "fd00::/64",
        ]);
        // The middle /28 moves away.
        let new = held(&[
            "10.0.0.0/8",
            "100.64.0.0/28",
            "100.64.0.32/27",
            "100.127.255.0/28",
            "fd00::/64",
        ]);
        // Before the switch: the new /28 alone, added; nothing deleted.
        let (script, after, added) = old.cover("subway_t", &new).unwrap();
        assert_eq!(added, held(&["100.127.255.0/28"]));
        assert_eq!(after.without(&added), old);
        assert_eq!(script, "add element inet subway_t tunnel4 { 100.127.255.0/28 }\n");
        // After it: the range that held the gone /28 is split.
        assert_eq!(
            after.tidy("subway_t", &new).unwrap(),
            "delete element inet subway_t tunnel4 { 100.64.0.0/26 }\n\
             add element inet subway_t tunnel4 { 100.64.0.0/28, 100.64.0.32/27 }\n"
        );
        assert_eq!(new.cover("subway_t", &new), None, "nothing to add: no nft at all");
        assert_eq!(new.tidy("subway_t", &new), None);
        // The same ranges from other prefixes: nothing either.
        let same = held(&["10.0.0.0/8", "100.64.0.0/26", "fd00::/64"]);
        assert_eq!(same.cover("subway_t", &old), None);
        assert_eq!(same.tidy("subway_t", &old), None);
        // A family emptied: only the tidy touches it.
        let v4 = held(&["10.0.0.0/8", "100.64.0.0/26"]);
        assert_eq!(old.cover("subway_t", &v4), None);
        assert_eq!(
            old.tidy("subway_t", &v4).unwrap(),
            "delete element inet subway_t tunnel6 { fd00::/64 }\n"
        );
        // A wider prefix around a held one: the two pieces around it are
        // added (an element may not overlap another); the tidy merges.
        let narrow = held(&["10.1.0.0/24"]);
        let wide = held(&["10.0.0.0/8"]);
        let (script, after, _) = narrow.cover("t", &wide).unwrap();
        assert_eq!(
            script,
            "add element inet t tunnel4 { 10.0.0.0/16, 10.1.1.0-10.255.255.255 }\n"
        );
        assert_eq!(
            after.tidy("t", &wide).unwrap(),
            "delete element inet t tunnel4 { 10.0.0.0/16, 10.1.0.0/24, 10.1.1.0-10.255.255.255 }\n\
             add element inet t tunnel4 { 10.0.0.0/8 }\n"
        );
    }

    /// Pieces added and removed at random, nested and repeated, with LAN
    /// holes among them: the folded list kept as they come and go is the
    /// one folded from scratch, after every step.
    #[test]
    fn the_folded_pieces_follow_adds_and_removes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for round in 0..50 {
            let mut p = Pieces {
                holes: vec![n("10.0.4.0/24"), n("10.0.8.128/25"), n("fd00::/120")],
                ..Default::default()
            };
            let mut present: Vec<IpNet> = Vec::new();
            for step in 0..200 {
                if present.is_empty() || rnd(3) != 0 {
                    let len = 12 + rnd(14) as u8;
                    let q = if rnd(5) == 0 {
                        IpNet::new(format!("fd00::{:x}", rnd(512)).parse().unwrap(), 112 + len / 2)
                    } else {
                        IpNet::new(
                            std::net::Ipv4Addr::from(0x0a00_0000u32 | (rnd(1 << 14) as u32) << 2).into(),
                            len,
                        )
                    }
                    .unwrap()
                    .trunc();
                    p.add(q);
                    present.push(q);
                } else {
                    let q = present.swap_remove(rnd(present.len() as u64) as usize);
                    p.remove(q);
                }
                let scratch = fold(p.pieces.iter().map(|(k, _)| *k));
                assert_eq!(p.folded, scratch, "round {round} step {step}");
            }
        }
    }

    /// Covers of the sets, their nft stood in for by `true` and `false`
    /// (a transaction that went in, one that nft refused): what the sets
    /// are taken to hold, and the tidy that follows.
    #[test]
    fn a_cover_finished_abandoned_or_refused() {
        let run = |ok: bool| NftRun(Command::new(if ok { "true" } else { "false" }).spawn().unwrap());
        let old = held(&["10.0.0.0/24", "10.9.0.0/24"]);
        // The change takes 10.9.0.0/24 out and puts 10.5.0.0/24 in.
        let new = held(&["10.0.0.0/24", "10.5.0.0/24"]);
        let old_fence = Fence {
            table: "t".into(),
            tunnelled: vec![n("10.0.0.0/24"), n("10.9.0.0/24")],
            ..Default::default()
        };
        let sets = || Sets {
            table: "t".into(),
            held: Some(old.clone()),
            want: None,
        };
        let (_, after, added) = old.cover("t", &new).unwrap();
        assert_eq!(added, held(&["10.5.0.0/24"]));
        let adding = |ok| Covering {
            step: CoverStep::Adding(run(ok), after.clone(), added.clone()),
            want: new.clone(),
        };
        // Finished: the sets hold the old and the new until the tidy after
        // the switch takes the old one out.
        let mut s = sets();
        s.cover_finish(adding(true), &old_fence).unwrap();
        assert_eq!(s.held, Some(after.clone()));
        assert_eq!(s.tidy().unwrap(), "delete element inet t tunnel4 { 10.9.0.0/24 }\n");
        // The change failed after its additions went in: nothing is
        // replaced, and the tidy takes the addition out again.
        let mut s = sets();
        assert!(s.cover_abandon(adding(true)));
        assert_eq!(s.held, Some(after.clone()));
        assert_eq!(s.tidy().unwrap(), "delete element inet t tunnel4 { 10.5.0.0/24 }\n");
        assert_eq!(s.held, Some(old.clone()));
        // nft refused the additions of a change that then failed: one
        // transaction, nothing changed, but the sets did not hold what
        // was thought: unknown, no tidy, the next change replaces them.
        let mut s = sets();
        assert!(!s.cover_abandon(adding(false)));
        assert_eq!((s.held.clone(), s.tidy()), (None, None));
        // Unknown sets abandoned: nothing to give back.
        let mut s = Sets { held: None, ..sets() };
        assert!(!s.cover_abandon(Covering {
            step: CoverStep::Replace,
            want: new.clone()
        }));
        // A replace (the sets unknown) keeps the running fence's prefixes
        // refused with the new ones until the switch: 10.9.0.0/24 is still
        // tunnelled until then. (Its nft is not run here: the script is.)
        let both = Held::of(&old_fence.tunnelled).union(&new);
        assert_eq!(both, held(&["10.0.0.0/24", "10.5.0.0/24", "10.9.0.0/24"]));
        assert_eq!(
            both.replace_script("t"),
            "flush set inet t tunnel4\nflush set inet t tunnel6\nadd element inet t tunnel4 { 10.0.0.0/24, 10.5.0.0/24, 10.9.0.0/24 }\n"
        );
        // Overlapping and adjacent ranges are merged.
        assert_eq!(
            held(&["10.0.0.0/25", "10.0.1.0/24"]).union(&held(&["10.0.0.0/24", "fd00::/64"])),
            held(&["10.0.0.0/23", "fd00::/64"])
        );
    }

    /// Random held and wanted ranges over a small space, against a bitmap:
    /// the additions cover exactly what is wanted and not held, so held
    /// and added together cover the wanted, and no two elements overlap.
    #[test]
    fn the_additions_are_exactly_what_is_wanted_and_not_held() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        // Sorted, disjoint ranges in 0..64, each address taken at random.
        let mut ranges = |p: u64| -> Vec<(u128, u128)> {
            let mut out: Vec<(u128, u128)> = Vec::new();
            for a in 0..64u128 {
                if next(100) < p {
                    match out.last_mut() {
                        // Adjacent ranges stay apart now and then.
                        Some(r) if r.1 + 1 == a && next(4) > 0 => r.1 = a,
                        _ => out.push((a, a)),
                    }
                }
            }
            out
        };
        let bits = |rs: &[(u128, u128)]| {
            rs.iter()
                .fold(0u64, |m, &(f, l)| m | (((1u128 << (l + 1)) - (1 << f)) as u64))
        };
        for _ in 0..2000 {
            let (want, held) = (ranges(60), ranges(40));
            let added = uncovered(&want, &held);
            assert_eq!(
                bits(&added),
                bits(&want) & !bits(&held),
                "{want:?} {held:?} -> {added:?}"
            );
            let mut all: Vec<(u128, u128)> = held.iter().chain(&added).copied().collect();
            all.sort_unstable();
            assert!(all.windows(2).all(|w| w[0].1 < w[1].0), "{all:?}");
        }
    }

    fn fib(entries: &[(u32, &str, Target)]) -> Fib {
        let mut f = Fib::new();
        for (vnet, p, t) in entries {
            f.insert(*vnet, n(p), *t).unwrap();
        }
        f
    }

    #[test]
    fn peer_prefixes_are_fenced() {
        let f = fib(&[
            (0, "10.1.0.0/24", Target::Port(0)),
            (0, "10.2.0.0/24", Target::Peer(0)),
            (0, "fd02::/64", Target::Peer(0)),
        ]);
        assert_eq!(tunnelled(f.routes()), vec![n("10.2.0.0/24"), n("fd02::/64")]);
    }

    #[test]
    fn a_more_specific_lan_inside_a_peer_prefix_is_not_fenced() {
        // Peer 10.0.0.0/8, LAN 10.1.0.0/16 inside it, and a second peer's
        // 10.1.5.0/24 inside the LAN: exactly the peers' space.
        let f = fib(&[
            (0, "10.0.0.0/8", Target::Peer(0)),
            (0, "10.1.0.0/16", Target::Port(0)),
            (0, "10.1.0.1/32", Target::Local),
            (0, "10.1.5.0/24", Target::Peer(1)),
        ]);
        let t = tunnelled(f.routes());
        let covered = |a: &str| t.iter().any(|p| p.contains(&a.parse::<IpAddr>().unwrap()));
        assert!(covered("10.200.0.1") && covered("10.0.0.1") && covered("10.1.5.7"));
        assert!(!covered("10.1.0.2") && !covered("10.1.4.255") && !covered("10.1.6.0"));
        assert!(!covered("11.0.0.1"));
        // No two overlap (nft interval sets refuse that).
        for (i, a) in t.iter().enumerate() {
            for b in &t[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
    }

    #[test]
    fn nested_peer_prefixes_fold_and_other_vnets_stay_out() {
        let f = fib(&[
            (0, "10.0.0.0/8", Target::Peer(0)),
            (0, "10.9.0.0/16", Target::Peer(1)),
            (1, "192.168.0.0/16", Target::Peer(2)),
        ]);
        assert_eq!(tunnelled(f.routes()), vec![n("10.0.0.0/8")]);
        // Host routes, and whole address families.
        let f = fib(&[
            (0, "10.9.9.9/32", Target::Peer(2)),
            (0, "192.0.2.7/32", Target::Peer(2)),
            (0, "192.0.2.8/32", Target::Peer(2)),
            (0, "fd00::1/128", Target::Peer(2)),
            (0, "fd00::/16", Target::Peer(3)),
            (0, "10.0.0.0/8", Target::Peer(0)),
        ]);
        assert_eq!(
            tunnelled(f.routes()),
            vec![n("10.0.0.0/8"), n("192.0.2.7/32"), n("192.0.2.8/32"), n("fd00::/16")]
        );
        let f = fib(&[
            (0, "::/0", Target::Peer(0)),
            (0, "fd00::1/128", Target::Peer(1)),
            (0, "0.0.0.0/0", Target::Peer(1)),
        ]);
        assert_eq!(tunnelled(f.routes()), vec![n("0.0.0.0/0"), n("::/0")]);
    }

    #[test]
    fn a_lan_equal_to_nothing_and_a_default_route_peer() {
        // A full-tunnel peer (0.0.0.0/0) around a LAN: everything but the LAN.
        let f = fib(&[(0, "0.0.0.0/0", Target::Peer(0)), (0, "10.1.0.0/24", Target::Port(0))]);
        let t = tunnelled(f.routes());
        assert_eq!(t.len(), 24, "{t:?}");
        assert!(!t.iter().any(|p| p.contains(&"10.1.0.9".parse::<IpAddr>().unwrap())));
        assert!(t.iter().any(|p| p.contains(&"10.1.1.0".parse::<IpAddr>().unwrap())));
    }

    #[test]
    fn adjacent_prefixes_are_one_element_and_gaps_stay() {
        let nets: Vec<IpNet> = (0..1000u32)
            .map(|i| IpNet::new(IpAddr::from(std::net::Ipv4Addr::from(0x6440_0000 + i * 16)), 28).unwrap())
            .chain([n("100.80.0.0/24"), n("100.80.1.0/24"), n("::/0")])
            .collect();
        // 1,000 /28s from 100.64.0.0: 16,000 addresses, not a prefix.
        assert_eq!(elements(&nets, true), "100.64.0.0-100.64.62.127, 100.80.0.0/23");
        assert_eq!(elements(&nets, false), "::/0");
        assert_eq!(elements(&[n("0.0.0.0/1"), n("128.0.0.0/1")], true), "0.0.0.0/0");
        assert_eq!(elements(&[n("10.0.0.1/32")], true), "10.0.0.1/32");
    }

    #[test]
    fn ruleset_lets_only_the_tun_and_our_port_carry_tunnelled_prefixes() {
        let f = Fence {
            table: table_name("site-a"),
            tun: "sw-site-a".into(),
            listen_port: 51820,
            tunnelled: vec![n("10.2.0.0/24"), n("fd02::/64")],
            vnet_ifaces: vec![],
            vnet_only_addrs: vec![],
        };
        let r = f.ruleset();
        assert!(r.starts_with("table inet subway_site_a {}\ndelete table inet subway_site_a\n"));
        assert!(r.contains("oifname \"sw-site-a\" accept\n  ip daddr @tunnel4 counter name tunnel_refused reject"));
        assert!(r.contains("udp sport 51820 accept"));
        assert!(r.contains("add element inet subway_site_a tunnel4 { 10.2.0.0/24 }"));
        assert!(r.contains("add element inet subway_site_a tunnel6 { fd02::/64 }"));
        assert!(!r.contains("iifname {"), "no VNET fence without VNET interfaces");
        assert!(
            r.contains("set tunnel4 { type ipv4_addr; flags interval; }"),
            "no auto-merge: {r}"
        );
        let u = Held::of(&f.tunnelled).replace_script(&f.table);
        assert_eq!(
            u,
            "flush set inet subway_site_a tunnel4\nflush set inet subway_site_a tunnel6\n\
             add element inet subway_site_a tunnel4 { 10.2.0.0/24 }\n\
             add element inet subway_site_a tunnel6 { fd02::/64 }\n"
        );
    }
}
