//! Policies: ordered allow/deny rules per VNET, enforced by the workers,
//! stateful.
//!
//! - [`Rule`]s match on ingress (a LAN port or a peer), source and
//!   destination prefix, protocol and destination port range; the first
//!   match decides, else the VNET's default action. A VNET without a
//!   policy is not classified at all.
//! - [`Classifier`]: with many rules a linear scan per packet is too slow,
//!   so each field is cut into elementary intervals, each holding the
//!   bitset of the rules that match it (Lakshman and Stiliadis's bit
//!   vector search): a packet costs a binary search per field and an AND
//!   of the bitsets, whose first set bit is the deciding rule.
//! - [`FlowTable`]: a flow a rule allowed is remembered, so its replies
//!   (and its later packets) pass without a rule of their own, as do ICMP
//!   errors about it (PMTU discovery). One table shared by every worker,
//!   open addressing over atomics, keyed by a fingerprint of the flow's
//!   normalized 5-tuple (both directions give one key, so the two halves
//!   of a flow may be handled by different workers); bounded, with
//!   conntrack-like timeouts, evicting the entry closest to expiry when a
//!   neighbourhood is full. The fingerprint is a keyed 64-bit SipHash, so
//!   a sender cannot aim a packet at another flow's entry.
//!
//! [`check`] is what the workers call, and `route explain` calls it too
//! (without remembering the flow).

use crate::fib::{VnetId, addr_num};
use ipnet::IpNet;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
        }
    }

    fn index(n: u8) -> usize {
        match n {
            6 => 0,
            17 => 1,
            1 => 2,
            58 => 3,
            _ => 4,
        }
    }
}

/// Where a packet entered the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ingress {
    /// A LAN port (by index).
    Lan(u16),
    /// Out of the tunnel from a peer (by id).
    Peer(u32),
}

/// One rule; None fields match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub ingress: Option<Ingress>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub proto: Option<Proto>,
    /// Destination ports, inclusive (TCP and UDP only).
    pub ports: Option<(u16, u16)>,
    /// As written ("allow in lan0 proto tcp port 443").
    pub text: String,
    /// Its line in the config file.
    pub line: usize,
}

impl Rule {
    /// The reference semantics the classifier must agree with.
    pub fn matches(&self, p: &Packet, ingress: Ingress) -> bool {
        self.ingress.is_none_or(|i| i == ingress)
            && self.src.is_none_or(|n| n.contains(&p.src))
            && self.dst.is_none_or(|n| n.contains(&p.dst))
            && self.proto.is_none_or(|x| x.number() == p.proto)
            && self
                .ports
                .is_none_or(|(lo, hi)| p.dport.is_some_and(|d| lo <= d && d <= hi))
    }
}

/// A VNET's rules and default action, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub vnet: VnetId,
    pub default: Action,
    pub rules: Vec<Rule>,
}

/// Flow table size and timeouts (seconds), from `[Tuning]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    pub max_flows: usize,
    pub tcp_secs: u32,
    pub udp_secs: u32,
    pub other_secs: u32,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            max_flows: 262_144,
            tcp_secs: 3600,
            udp_secs: 120,
            other_secs: 30,
        }
    }
}

/// A TCP flow that saw FIN or RST lingers this long.
const TCP_CLOSING_SECS: u32 = 10;

/// The fields a policy looks at, parsed from an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// TCP FIN or RST.
    pub closing: bool,
    /// An ICMP echo (request or reply), whose identifier stands for both
    /// ports of its flow.
    pub echo: bool,
    /// An ICMP error: the header of the packet it is about.
    pub about: Option<(IpAddr, IpAddr, u8, u16, u16)>,
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// (src, dst, protocol, offset of L4, first fragment) of an IP header.
fn ip_header(ip: &[u8]) -> Option<(IpAddr, IpAddr, u8, usize, bool)> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let frag_off = be16(ip, 6)? & 0x1fff;
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            Some((s.into(), d.into(), ip[9], ihl.max(20), frag_off == 0))
        }
        6 if ip.len() >= 40 => {
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            Some((s.into(), d.into(), ip[6], 40, true))
        }
        _ => None,
    }
}

impl Packet {
    /// Parses an IP packet's addresses, protocol and ports; None if it is
    /// not IPv4 or IPv6 (the router already refused malformed headers).
    pub fn parse(ip: &[u8]) -> Option<Packet> {
        let (src, dst, proto, l4, first) = ip_header(ip)?;
        let mut p = Packet {
            src,
            dst,
            proto,
            sport: None,
            dport: None,
            closing: false,
            echo: false,
            about: None,
        };
        if !first {
            return Some(p);
        }
        match proto {
            6 | 17 => {
                p.sport = be16(ip, l4);
                p.dport = be16(ip, l4 + 2);
                if proto == 6 {
                    p.closing = ip.get(l4 + 13).is_some_and(|f| f & 0x05 != 0);
                }
            }
            1 | 58 => {
                let t = *ip.get(l4).unwrap_or(&255);
                let echo = if proto == 1 {
                    t == 8 || t == 0
                } else {
                    t == 128 || t == 129
                };
                let error = if proto == 1 {
                    matches!(t, 3 | 11 | 12)
                } else {
                    matches!(t, 1..=4)
                };
                if echo {
                    p.echo = true;
                    p.sport = be16(ip, l4 + 4);
                    p.dport = p.sport;
                } else if error
                    && let Some(inner) = ip.get(l4 + 8..)
                    && let Some((s, d, pr, il4, _)) = ip_header(inner)
                {
                    let (a, b) = match pr {
                        6 | 17 => (be16(inner, il4).unwrap_or(0), be16(inner, il4 + 2).unwrap_or(0)),
                        1 | 58 => {
                            let id = be16(inner, il4 + 4).unwrap_or(0);
                            (id, id)
                        }
                        _ => (0, 0),
                    };
                    p.about = Some((s, d, pr, a, b));
                }
            }
            _ => {}
        }
        Some(p)
    }
}

// ---------------------------------------------------------------------
// The classifier.

/// Rule bitsets, `words` u64 each, stored flat.
#[derive(Clone, Debug, Default)]
struct Sets {
    words: usize,
    data: Vec<u64>,
}

impl Sets {
    fn new(words: usize) -> Sets {
        Sets {
            words,
            data: Vec::new(),
        }
    }

    /// Appends a set holding the rules for which `f(rule)` holds.
    fn push(&mut self, n: usize, f: impl Fn(usize) -> bool) {
        let at = self.data.len();
        self.data.resize(at + self.words, 0);
        for r in 0..n {
            if f(r) {
                self.data[at + r / 64] |= 1 << (r % 64);
            }
        }
    }

    #[inline]
    fn get(&self, i: usize) -> &[u64] {
        &self.data[i * self.words..(i + 1) * self.words]
    }
}

/// One address or port dimension cut into elementary intervals.
#[derive(Clone, Debug, Default)]
struct Intervals {
    /// Interval i is [starts[i], starts[i + 1]).
    starts: Vec<u128>,
    sets: Sets,
}

/// What a rule asks of a dimension: everything, nothing, or a range.
#[derive(Clone, Copy)]
enum Span {
    All,
    None,
    Range(u128, u128),
}

impl Span {
    fn covers(self, x: u128) -> bool {
        match self {
            Span::All => true,
            Span::None => false,
            Span::Range(lo, hi) => lo <= x && x <= hi,
        }
    }
}

impl Intervals {
    fn build(spans: &[Span], words: usize) -> Intervals {
        let mut starts = vec![0u128];
        for s in spans {
            if let Span::Range(lo, hi) = *s {
                starts.push(lo);
                if let Some(n) = hi.checked_add(1) {
                    starts.push(n);
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut sets = Sets::new(words);
        for &x in &starts {
            sets.push(spans.len(), |r| spans[r].covers(x));
        }
        Intervals { starts, sets }
    }

    #[inline]
    fn lookup(&self, x: u128) -> &[u64] {
        // starts[0] == 0, so the index is at least 0.
        let i = self.starts.partition_point(|s| *s <= x) - 1;
        self.sets.get(i)
    }
}

fn prefix_span(n: &IpNet, v6: bool) -> Span {
    match (n, v6) {
        (IpNet::V4(n), false) => Span::Range(u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128),
        (IpNet::V6(n), true) => Span::Range(u128::from(n.network()), u128::from(n.broadcast())),
        _ => Span::None,
    }
}

/// A VNET's rules compiled for lookups.
#[derive(Clone, Debug)]
pub struct Classifier {
    rules: usize,
    /// [v4, v6] for source and destination.
    src: [Intervals; 2],
    dst: [Intervals; 2],
    /// By protocol index (tcp, udp, icmp, icmpv6, other).
    proto: Sets,
    ports: Intervals,
    /// Rules that ask no port (for packets without one).
    no_port: Vec<u64>,
    /// By LAN port, by peer id; rules that name no ingress for the rest.
    lans: Sets,
    peers: Sets,
    any_ingress: Vec<u64>,
}

impl Classifier {
    pub fn new(rules: &[Rule]) -> Classifier {
        let n = rules.len();
        let words = n.div_ceil(64).max(1);
        let addr = |pick: fn(&Rule) -> Option<IpNet>, v6: bool| {
            let spans: Vec<Span> = rules
                .iter()
                .map(|r| pick(r).map_or(Span::All, |p| prefix_span(&p, v6)))
                .collect();
            Intervals::build(&spans, words)
        };
        let mut proto = Sets::new(words);
        for num in [6u8, 17, 1, 58, 255] {
            proto.push(n, |r| rules[r].proto.is_none_or(|p| p.number() == num));
        }
        let port_spans: Vec<Span> = rules
            .iter()
            .map(|r| {
                r.ports
                    .map_or(Span::All, |(lo, hi)| Span::Range(lo as u128, hi as u128))
            })
            .collect();
        let mut no_port = Sets::new(words);
        no_port.push(n, |r| rules[r].ports.is_none());
        // An ingress beyond these bounds names nothing that exists: its
        // rules match no packet.
        let max_lan = rules
            .iter()
            .filter_map(|r| match r.ingress {
                Some(Ingress::Lan(p)) if p < 4096 => Some(p as usize + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let max_peer = rules
            .iter()
            .filter_map(|r| match r.ingress {
                Some(Ingress::Peer(p)) if p < 1 << 20 => Some(p as usize + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut lans = Sets::new(words);
        for l in 0..max_lan {
            lans.push(n, |r| rules[r].ingress.is_none_or(|i| i == Ingress::Lan(l as u16)));
        }
        let mut peers = Sets::new(words);
        for p in 0..max_peer {
            peers.push(n, |r| rules[r].ingress.is_none_or(|i| i == Ingress::Peer(p as u32)));
        }
        let mut any = Sets::new(words);
        any.push(n, |r| rules[r].ingress.is_none());
        Classifier {
            rules: n,
            src: [addr(|r| r.src, false), addr(|r| r.src, true)],
            dst: [addr(|r| r.dst, false), addr(|r| r.dst, true)],
            proto,
            ports: Intervals::build(&port_spans, words),
            no_port: no_port.data,
            lans,
            peers,
            any_ingress: any.data,
        }
    }

    /// The first rule that matches, by index.
    #[inline]
    pub fn first_match(&self, p: &Packet, ingress: Ingress) -> Option<usize> {
        if self.rules == 0 {
            return None;
        }
        let fam = p.src.is_ipv6() as usize;
        let s = self.src[fam].lookup(addr_num(p.src));
        let d = self.dst[fam].lookup(addr_num(p.dst));
        let pr = self.proto.get(Proto::index(p.proto));
        let po: &[u64] = match p.dport {
            Some(x) if p.proto == 6 || p.proto == 17 => self.ports.lookup(x as u128),
            _ => &self.no_port,
        };
        let ing: &[u64] = match ingress {
            Ingress::Lan(l) if (l as usize) * self.lans.words < self.lans.data.len() => self.lans.get(l as usize),
            Ingress::Peer(x) if (x as usize) * self.peers.words < self.peers.data.len() => self.peers.get(x as usize),
            _ => &self.any_ingress,
        };
        for w in 0..s.len() {
            let m = s[w] & d[w] & pr[w] & po[w] & ing[w];
            if m != 0 {
                return Some(w * 64 + m.trailing_zeros() as usize);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------
// The flow table.

/// Slots per bucket (two 64-byte cache lines). A flow may live in either
/// of two buckets chosen by its fingerprint, and is put in the emptier
/// one: two-choice hashing keeps overflow rare up to high load, where one
/// linear probe sequence clusters.
const BUCKET: usize = 8;

struct Slot {
    /// The flow's fingerprint; 0: never used.
    fp: AtomicU64,
    /// expiry (monotonic seconds) << 32 | generation << 16 | rule.
    meta: AtomicU64,
}

/// The rule slot of a flow allowed by the VNET's default action.
pub const DEFAULT_RULE: u16 = u16::MAX;

/// Flows allowed by a policy, shared by every worker.
pub struct FlowTable {
    slots: Box<[Slot]>,
    hasher: std::hash::RandomState,
    pub limits: FlowLimits,
    inserted: AtomicU64,
    evicted: AtomicU64,
}

/// What a flow entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHit {
    pub generation: u16,
    pub rule: u16,
}

impl FlowTable {
    /// A table for about `limits.max_flows` flows (rounded up to a power
    /// of two slots; 0: no table).
    pub fn new(limits: FlowLimits) -> FlowTable {
        let n = if limits.max_flows == 0 {
            0
        } else {
            limits.max_flows.next_power_of_two().max(2 * BUCKET)
        };
        FlowTable {
            slots: (0..n)
                .map(|_| Slot {
                    fp: AtomicU64::new(0),
                    meta: AtomicU64::new(0),
                })
                .collect(),
            hasher: std::hash::RandomState::new(),
            limits,
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The flow's fingerprint (never 0): both directions give the same.
    #[inline]
    fn fingerprint(&self, vnet: VnetId, proto: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> u64 {
        let (lo, hi) = if (addr_num(a.0), a.1) <= (addr_num(b.0), b.1) {
            (a, b)
        } else {
            (b, a)
        };
        // One write of the packed key: SipHash per call is dearer than
        // per byte.
        let mut k = [0u8; 41];
        k[..4].copy_from_slice(&vnet.to_le_bytes());
        k[4] = proto;
        k[5..21].copy_from_slice(&addr_num(lo.0).to_le_bytes());
        k[21..23].copy_from_slice(&lo.1.to_le_bytes());
        k[23..39].copy_from_slice(&addr_num(hi.0).to_le_bytes());
        k[39..41].copy_from_slice(&hi.1.to_le_bytes());
        let mut h = self.hasher.build_hasher();
        std::hash::Hasher::write(&mut h, &k);
        std::hash::Hasher::finish(&h) | 1
    }

    fn timeout(&self, proto: u8, closing: bool) -> u32 {
        match proto {
            6 if closing => TCP_CLOSING_SECS,
            6 => self.limits.tcp_secs,
            17 => self.limits.udp_secs,
            _ => self.limits.other_secs,
        }
    }

    /// The two buckets a fingerprint may live in (first slot of each).
    #[inline]
    fn buckets(&self, fp: u64) -> [usize; 2] {
        let n = self.slots.len() / BUCKET;
        [
            (fp as usize & (n - 1)) * BUCKET,
            ((fp >> 32) as usize & (n - 1)) * BUCKET,
        ]
    }

    #[inline]
    fn find(&self, fp: u64, now: u32) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        for b in self.buckets(fp) {
            for s in &self.slots[b..b + BUCKET] {
                let f = s.fp.load(Relaxed);
                if f == 0 {
                    // A bucket fills in order and a slot is never emptied:
                    // nothing lies past a never-used slot.
                    break;
                }
                if f == fp && (s.meta.load(Relaxed) >> 32) as u32 > now {
                    return Some(s);
                }
            }
        }
        None
    }

    /// Whether the flow is known (and not expired), and the rule that
    /// allowed it, renumbered by `current` (None: no longer a rule). The
    /// entry's life is extended, and its rule number brought up to date,
    /// unless `peek`.
    #[inline]
    fn hit(&self, fp: u64, proto: u8, closing: bool, now: u32, peek: bool, pol: &VnetPolicy) -> Option<Option<u16>> {
        let s = self.find(fp, now)?;
        let meta = s.meta.load(Relaxed);
        let (generation, rule) = ((meta >> 16) as u16, meta as u16);
        let now_rule = pol.current(generation, rule);
        if !peek {
            let until = now.saturating_add(self.timeout(proto, closing));
            let was = (meta >> 32) as u32;
            let retag = generation != pol.generation && now_rule.is_some();
            // At most one write a second per flow (or when it closes, or
            // its rule was renumbered by a reload).
            if retag || until > was.saturating_add(1) || (closing && until < was) {
                let tag = match now_rule {
                    Some(r) if retag => (pol.generation as u64) << 16 | r as u64,
                    _ => meta & 0xffff_ffff,
                };
                s.meta
                    .store((until.max(if closing { 0 } else { was }) as u64) << 32 | tag, Relaxed);
            }
        }
        Some(now_rule)
    }

    /// Remembers a flow, in the emptier of its two buckets; when both are
    /// full of live flows the one closest to expiry gives way (counted).
    fn insert(&self, fp: u64, proto: u8, closing: bool, now: u32, hit: FlowHit) {
        if self.slots.is_empty() {
            return;
        }
        let until = now.saturating_add(self.timeout(proto, closing));
        let meta = (until as u64) << 32 | (hit.generation as u64) << 16 | hit.rule as u64;
        let [b1, b2] = self.buckets(fp);
        // Already there (another worker was first): refresh it.
        for b in [b1, b2] {
            for s in &self.slots[b..b + BUCKET] {
                if s.fp.load(Relaxed) == fp {
                    s.meta.store(meta, Relaxed);
                    return;
                }
            }
        }
        let live = |b: usize| {
            self.slots[b..b + BUCKET]
                .iter()
                .filter(|s| s.fp.load(Relaxed) != 0 && (s.meta.load(Relaxed) >> 32) as u32 > now)
                .count()
        };
        let order = if live(b2) < live(b1) { [b2, b1] } else { [b1, b2] };
        let mut victim: Option<(usize, u32)> = None;
        for b in order {
            for at in b..b + BUCKET {
                let s = &self.slots[at];
                let f = s.fp.load(Relaxed);
                let exp = (s.meta.load(Relaxed) >> 32) as u32;
                if (f == 0 || exp <= now) && s.fp.compare_exchange(f, fp, Relaxed, Relaxed).is_ok() {
                    s.meta.store(meta, Relaxed);
                    self.inserted.fetch_add(1, Relaxed);
                    return;
                }
                if victim.is_none_or(|(_, e)| exp < e) {
                    victim = Some((at, exp));
                }
            }
        }
        if let Some((at, _)) = victim {
            let s = &self.slots[at];
            s.fp.store(fp, Relaxed);
            s.meta.store(meta, Relaxed);
            self.inserted.fetch_add(1, Relaxed);
            self.evicted.fetch_add(1, Relaxed);
        }
    }

    /// (live flows, capacity, inserted, evicted): live flows are counted
    /// by a scan (for `show`, not the workers).
    pub fn stats(&self, now: u32) -> FlowStats {
        let live = self
            .slots
            .iter()
            .filter(|s| s.fp.load(Relaxed) != 0 && (s.meta.load(Relaxed) >> 32) as u32 > now)
            .count();
        FlowStats {
            flows: live as u64,
            capacity: self.slots.len() as u64,
            inserted: self.inserted.load(Relaxed),
            evicted: self.evicted.load(Relaxed),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub flows: u64,
    pub capacity: u64,
    pub inserted: u64,
    pub evicted: u64,
}

// ---------------------------------------------------------------------
// Policies as the workers see them.

/// Packets and bytes of one rule (or of the default action).
#[derive(Default)]
pub struct RuleCount {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

/// A VNET's policy, compiled, with its counters.
pub struct VnetPolicy {
    pub config: PolicyConfig,
    pub classifier: Classifier,
    /// One per rule, then the default action's.
    pub counts: Box<[RuleCount]>,
    /// Packets passed as part of a known flow (or ICMP errors about one).
    pub established: AtomicU64,
    /// Bumped by every rebuild: a flow entry of an older generation passes
    /// and is counted under its rule's new number, found through `remap`
    /// (the previous generation, and old rule number -> new one), or under
    /// no rule if its rule is gone or older.
    pub generation: u16,
    remap: Option<(u16, Box<[u16]>)>,
}

impl std::fmt::Debug for VnetPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VnetPolicy").field("config", &self.config).finish()
    }
}

impl VnetPolicy {
    /// Compiles `config`; the counters of rules whose text is unchanged
    /// carry over from `old`.
    pub fn new(config: PolicyConfig, old: Option<&VnetPolicy>, generation: u16) -> VnetPolicy {
        let counts: Box<[RuleCount]> = (0..=config.rules.len()).map(|_| RuleCount::default()).collect();
        let n = config.rules.len();
        let mut remap = None;
        if let Some(old) = old {
            // Each old rule to the first unclaimed new rule of the same text.
            let mut map = vec![NO_RULE; old.config.rules.len()];
            let mut claimed = vec![false; n];
            for (j, o) in old.config.rules.iter().enumerate() {
                if let Some(i) = (0..n).find(|&i| !claimed[i] && config.rules[i].text == o.text) {
                    claimed[i] = true;
                    map[j] = i as u16;
                    counts[i].packets.store(old.counts[j].packets.load(Relaxed), Relaxed);
                    counts[i].bytes.store(old.counts[j].bytes.load(Relaxed), Relaxed);
                }
            }
            let (d, od) = (&counts[n], &old.counts[old.config.rules.len()]);
            d.packets.store(od.packets.load(Relaxed), Relaxed);
            d.bytes.store(od.bytes.load(Relaxed), Relaxed);
            remap = Some((old.generation, map.into_boxed_slice()));
        }
        VnetPolicy {
            classifier: Classifier::new(&config.rules),
            config,
            counts,
            established: AtomicU64::new(old.map_or(0, |o| o.established.load(Relaxed))),
            generation,
            remap,
        }
    }

    /// The current number of rule `rule` of generation `generation`.
    #[inline]
    fn current(&self, generation: u16, rule: u16) -> Option<u16> {
        if generation == self.generation {
            return Some(rule);
        }
        let (g, map) = self.remap.as_ref()?;
        if *g != generation {
            return None;
        }
        if rule == DEFAULT_RULE {
            return Some(DEFAULT_RULE);
        }
        map.get(rule as usize).copied().filter(|r| *r != NO_RULE)
    }
}

/// A rule number no rule has.
const NO_RULE: u16 = u16::MAX - 1;

/// Every VNET's policy (None: not classified) and the flow table.
#[derive(Clone, Default)]
pub struct Policies {
    pub by_vnet: Vec<Option<Arc<VnetPolicy>>>,
    pub flows: Option<Arc<FlowTable>>,
    pub generation: u16,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies").field("by_vnet", &self.by_vnet).finish()
    }
}

impl Policies {
    #[inline]
    pub fn of(&self, vnet: VnetId) -> Option<&VnetPolicy> {
        self.by_vnet.get(vnet as usize).and_then(|p| p.as_deref())
    }

    pub fn is_empty(&self) -> bool {
        self.by_vnet.iter().all(Option::is_none)
    }

    /// The policies of `configs`, compiled, as the next generation after
    /// `cur` (whose rule counters carry over by rule text, and whose flow
    /// table is kept: flows allowed before a reload stay allowed).
    pub fn build(configs: &[PolicyConfig], limits: FlowLimits, cur: &Policies) -> Policies {
        let generation = cur.generation.wrapping_add(1);
        let n = configs.iter().map(|c| c.vnet as usize + 1).max().unwrap_or(0);
        let mut by_vnet: Vec<Option<Arc<VnetPolicy>>> = vec![None; n];
        for c in configs {
            let old = cur.of(c.vnet);
            by_vnet[c.vnet as usize] = Some(Arc::new(VnetPolicy::new(c.clone(), old, generation)));
        }
        let flows = match &cur.flows {
            Some(f) => Some(f.clone()),
            None if !configs.is_empty() => Some(Arc::new(FlowTable::new(limits))),
            None => None,
        };
        Policies {
            by_vnet,
            flows,
            generation,
        }
    }
}

/// Where a verdict's IP packet is in its frame, if the policy judges it:
/// what is forwarded (to a LAN, into the tunnel, or through the kernel for
/// a neighbour or a route), not what is for the box itself or comes back
/// as an ICMP error from it.
#[inline]
pub fn policed(v: &crate::forward::Verdict) -> Option<std::ops::Range<usize>> {
    use crate::forward::Verdict;
    use crate::stats::Counter;
    match *v {
        Verdict::Tx(_) => Some(14..usize::MAX),
        Verdict::Tunnel { l3, ip_len, .. } => Some(l3..l3 + ip_len),
        Verdict::SlowPath(l3, Counter::SlowNeighUnknown | Counter::SlowNoRoute) => Some(l3..usize::MAX),
        _ => None,
    }
}

/// The IP packet in `frame` that [`policed`] names, if any (clipped to
/// the frame).
#[inline]
pub fn policed_ip<'a>(v: &crate::forward::Verdict, frame: &'a [u8]) -> Option<&'a [u8]> {
    policed(v).map(|at| &frame[at.start.min(frame.len())..at.end.min(frame.len())])
}

/// Why a packet passed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Part of a flow a rule allowed (rule as stored, if still current).
    Established(Option<u16>),
    /// An ICMP error about a known flow.
    Related,
    /// Rule i allowed it (DEFAULT_RULE: the default action).
    Allowed(u16),
    Denied(u16),
    /// Not an IP packet the policy can read: refused.
    Unreadable,
}

impl Decision {
    pub fn passes(self) -> bool {
        matches!(
            self,
            Decision::Established(_) | Decision::Related | Decision::Allowed(_)
        )
    }

    /// The rule whose counters the packet adds to (index into `counts`).
    pub fn counted_rule(self, pol: &VnetPolicy) -> Option<usize> {
        let idx = |r: u16| {
            if r == DEFAULT_RULE {
                pol.config.rules.len()
            } else {
                r as usize
            }
        };
        match self {
            Decision::Established(Some(r)) | Decision::Allowed(r) | Decision::Denied(r) => Some(idx(r)),
            _ => None,
        }
    }
}

/// Decides `ip` (an IP packet entering at `ingress` in a VNET with policy
/// `pol`), remembering a newly allowed flow unless `peek` (route explain).
#[inline]
pub fn check(
    pol: &VnetPolicy,
    flows: Option<&FlowTable>,
    vnet: VnetId,
    ingress: Ingress,
    ip: &[u8],
    now_secs: u32,
    peek: bool,
) -> Decision {
    let Some(p) = Packet::parse(ip) else {
        return Decision::Unreadable;
    };
    let tracked = p.sport.is_some() && (p.proto != 1 && p.proto != 58 || p.echo);
    let fp = match flows {
        Some(f) if tracked => {
            let fp = f.fingerprint(
                vnet,
                p.proto,
                (p.src, p.sport.unwrap_or(0)),
                (p.dst, p.dport.unwrap_or(0)),
            );
            if let Some(rule) = f.hit(fp, p.proto, p.closing, now_secs, peek, pol) {
                return Decision::Established(rule);
            }
            Some(fp)
        }
        Some(f) => {
            if let Some((s, d, pr, a, b)) = p.about {
                let fp = f.fingerprint(vnet, pr, (s, a), (d, b));
                if f.find(fp, now_secs).is_some() {
                    return Decision::Related;
                }
            }
            None
        }
        None => None,
    };
    let (rule, action) = match pol.classifier.first_match(&p, ingress) {
        Some(i) => (i as u16, pol.config.rules[i].action),
        None => (DEFAULT_RULE, pol.config.default),
    };
    if action == Action::Deny {
        return Decision::Denied(rule);
    }
    if let (Some(f), Some(fp), false) = (flows, fp, peek) {
        f.insert(
            fp,
            p.proto,
            p.closing,
            now_secs,
            FlowHit {
                generation: pol.generation,
                rule,
            },
        );
    }
    Decision::Allowed(rule)
}

/// A worker's per-rule counts for one batch: added to the shared counters
/// when the (policy, rule) changes and at the end of the batch, so a batch
/// of one flow costs one atomic add, not one per packet.
#[derive(Default)]
pub struct RuleTally<'a> {
    pol: Option<&'a VnetPolicy>,
    /// Index into `counts`, or usize::MAX for none.
    rule: usize,
    packets: u64,
    bytes: u64,
    established: u64,
}

impl<'a> RuleTally<'a> {
    #[inline]
    pub fn add(&mut self, pol: &'a VnetPolicy, d: Decision, bytes: usize) {
        let rule = d.counted_rule(pol).unwrap_or(usize::MAX);
        if !self.pol.is_some_and(|p| std::ptr::eq(p, pol)) || self.rule != rule {
            self.flush();
            self.pol = Some(pol);
            self.rule = rule;
        }
        self.packets += 1;
        self.bytes += bytes as u64;
        if matches!(d, Decision::Established(_) | Decision::Related) {
            self.established += 1;
        }
    }

    /// Adds what was counted to the shared counters.
    pub fn flush(&mut self) {
        if let Some(pol) = self.pol.take() {
            if let Some(c) = pol.counts.get(self.rule) {
                c.packets.fetch_add(self.packets, Relaxed);
                c.bytes.fetch_add(self.bytes, Relaxed);
            }
            if self.established > 0 {
                pol.established.fetch_add(self.established, Relaxed);
            }
        }
        self.packets = 0;
        self.bytes = 0;
        self.established = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so failures replay.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn addr(r: &mut Rng, v6: bool) -> IpAddr {
        // Few distinct values so that rules and packets meet often.
        let x = r.below(4) as u8;
        let y = r.below(4) as u8;
        if v6 {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0xfd00,
                x as u16,
                y as u16,
                0,
                0,
                0,
                0,
                r.below(3) as u16,
            ))
        } else {
            IpAddr::V4(std::net::Ipv4Addr::new(10, x, y, r.below(3) as u8))
        }
    }

    fn prefix(r: &mut Rng, v6: bool) -> IpNet {
        let a = addr(r, v6);
        let len = if v6 {
            [16, 32, 48, 128][r.below(4) as usize]
        } else {
            [8, 16, 24, 32][r.below(4) as usize]
        };
        IpNet::new(a, len).unwrap().trunc()
    }

    fn random_rule(r: &mut Rng) -> Rule {
        let v6 = r.below(2) == 1;
        let proto = [
            None,
            Some(Proto::Tcp),
            Some(Proto::Udp),
            Some(Proto::Icmp),
            Some(Proto::Icmpv6),
        ][r.below(5) as usize];
        Rule {
            action: if r.below(2) == 0 { Action::Allow } else { Action::Deny },
            ingress: match r.below(4) {
                0 => Some(Ingress::Lan(r.below(3) as u16)),
                1 => Some(Ingress::Peer(r.below(3) as u32)),
                _ => None,
            },
            src: (r.below(2) == 0).then(|| prefix(r, v6)),
            dst: (r.below(2) == 0).then(|| prefix(r, v6)),
            proto,
            ports: (matches!(proto, Some(Proto::Tcp | Proto::Udp)) && r.below(2) == 0).then(|| {
                let lo = r.below(100) as u16 + 400;
                (lo, lo + r.below(50) as u16)
            }),
            text: String::new(),
            line: 0,
        }
    }

    fn random_packet(r: &mut Rng) -> (Packet, Ingress) {
        let v6 = r.below(2) == 1;
        let proto = [6u8, 17, 1, 58, 47][r.below(5) as usize];
        let port = matches!(proto, 6 | 17).then(|| r.below(200) as u16 + 380);
        let p = Packet {
            src: addr(r, v6),
            dst: addr(r, v6),
            proto,
            sport: port,
            dport: port,
            closing: false,
            echo: false,
            about: None,
        };
        let ing = if r.below(2) == 0 {
            Ingress::Lan(r.below(4) as u16)
        } else {
            Ingress::Peer(r.below(4) as u32)
        };
        (p, ing)
    }

    #[test]
    fn the_classifier_agrees_with_a_naive_scan_on_random_rules_and_packets() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let n = [0usize, 1, 5, 63, 64, 65, 200][round % 7];
            let rules: Vec<Rule> = (0..n).map(|_| random_rule(&mut r)).collect();
            let c = Classifier::new(&rules);
            for _ in 0..500 {
                let (p, ing) = random_packet(&mut r);
                let naive = rules.iter().position(|x| x.matches(&p, ing));
                assert_eq!(c.first_match(&p, ing), naive, "round {round}: {p:?} from {ing:?}");
            }
        }
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An IPv4 TCP or UDP packet (header only, checksum not needed).
    pub(super) fn l4_packet(proto: u8, src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        p[12..16].copy_from_slice(&s.octets());
        p[16..20].copy_from_slice(&d.octets());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[33] = flags;
        p
    }

    /// Default deny, one rule allowing UDP (from `ingress`, or anywhere).
    pub(super) fn udp_policy(ingress: Option<Ingress>) -> VnetPolicy {
        let rule = Rule {
            action: Action::Allow,
            ingress,
            src: None,
            dst: None,
            proto: Some(Proto::Udp),
            ports: None,
            text: "allow proto udp".into(),
            line: 1,
        };
        policy(Action::Deny, vec![rule])
    }

    fn policy(default: Action, rules: Vec<Rule>) -> VnetPolicy {
        VnetPolicy::new(
            PolicyConfig {
                vnet: 0,
                default,
                rules,
            },
            None,
            1,
        )
    }

    fn allow_443() -> Rule {
        Rule {
            action: Action::Allow,
            ingress: Some(Ingress::Lan(0)),
            src: Some("10.1.0.0/24".parse().unwrap()),
            dst: Some("10.2.0.0/24".parse().unwrap()),
            proto: Some(Proto::Tcp),
            ports: Some((443, 443)),
            text: "allow in lan0 ...".into(),
            line: 0,
        }
    }

    #[test]
    fn replies_to_an_allowed_flow_pass_and_new_flows_the_other_way_do_not() {
        let pol = policy(Action::Deny, vec![allow_443()]);
        let flows = FlowTable::new(FlowLimits {
            max_flows: 1024,
            ..Default::default()
        });
        let lan = Ingress::Lan(0);
        let peer = Ingress::Peer(0);
        let syn = l4_packet(6, "10.1.0.2", "10.2.0.2", 40000, 443, 0x02);
        let reply = l4_packet(6, "10.2.0.2", "10.1.0.2", 443, 40000, 0x12);
        // Before the SYN, the reply is refused (default deny).
        assert_eq!(
            check(&pol, Some(&flows), 0, peer, &reply, 100, false),
            Decision::Denied(DEFAULT_RULE)
        );
        assert_eq!(
            check(&pol, Some(&flows), 0, lan, &syn, 100, false),
            Decision::Allowed(0)
        );
        assert_eq!(
            check(&pol, Some(&flows), 0, peer, &reply, 100, false),
            Decision::Established(Some(0))
        );
        // Port 22 and a connection opened from the far side are refused.
        let ssh = l4_packet(6, "10.1.0.2", "10.2.0.2", 40001, 22, 0x02);
        assert_eq!(
            check(&pol, Some(&flows), 0, lan, &ssh, 100, false),
            Decision::Denied(DEFAULT_RULE)
        );
        let inbound = l4_packet(6, "10.2.0.2", "10.1.0.2", 50000, 443, 0x02);
        assert!(!check(&pol, Some(&flows), 0, peer, &inbound, 100, false).passes());
        // The same flow in another VNET is another flow.
        assert!(!check(&pol, Some(&flows), 1, peer, &reply, 100, false).passes());
        // ICMP "fragmentation needed" about the flow passes (related).
        let mut icmp = vec![0u8; 28];
        icmp[0] = 0x45;
        icmp[9] = 1;
        icmp[12..16].copy_from_slice(&[10, 2, 0, 1]);
        icmp[16..20].copy_from_slice(&[10, 1, 0, 2]);
        icmp[20] = 3;
        icmp[21] = 4;
        icmp.extend_from_slice(&syn[..28]);
        assert_eq!(check(&pol, Some(&flows), 0, peer, &icmp, 100, false), Decision::Related);
        // A FIN shortens the flow's life; after it the reply is refused.
        let fin = l4_packet(6, "10.1.0.2", "10.2.0.2", 40000, 443, 0x11);
        assert!(check(&pol, Some(&flows), 0, lan, &fin, 101, false).passes());
        assert!(check(&pol, Some(&flows), 0, peer, &reply, 101 + TCP_CLOSING_SECS - 1, true).passes());
        assert!(!check(&pol, Some(&flows), 0, peer, &reply, 102 + TCP_CLOSING_SECS, false).passes());
        assert_eq!(flows.stats(100).inserted, 1);
    }

    #[test]
    fn echo_replies_pass_and_a_peek_remembers_nothing() {
        let rule = Rule {
            action: Action::Allow,
            ingress: None,
            src: None,
            dst: None,
            proto: Some(Proto::Icmp),
            ports: None,
            text: "allow proto icmp".into(),
            line: 0,
        };
        let pol = policy(Action::Deny, vec![rule]);
        let flows = FlowTable::new(FlowLimits {
            max_flows: 64,
            ..Default::default()
        });
        let echo = |t: u8, s: &str, d: &str| {
            let mut p = l4_packet(1, s, d, 0, 0, 0);
            p[20] = t;
            p[24..26].copy_from_slice(&77u16.to_be_bytes());
            p
        };
        let req = echo(8, "10.1.0.2", "10.2.0.2");
        let rep = echo(0, "10.2.0.2", "10.1.0.2");
        assert_eq!(
            check(&pol, Some(&flows), 0, Ingress::Lan(0), &req, 5, true),
            Decision::Allowed(0)
        );
        assert_eq!(flows.stats(5).flows, 0, "explain must not remember");
        assert_eq!(
            check(&pol, Some(&flows), 0, Ingress::Lan(0), &req, 5, false),
            Decision::Allowed(0)
        );
        assert_eq!(
            check(&pol, Some(&flows), 0, Ingress::Peer(0), &rep, 6, false),
            Decision::Established(Some(0))
        );
        // The allow rule is for ICMP: replies are also allowed by it, but
        // they were counted as established first.
        let _ = v4("10.0.0.1");
    }

    #[test]
    fn a_full_table_evicts_the_flow_closest_to_expiry_and_counts_it() {
        let flows = FlowTable::new(FlowLimits {
            max_flows: 16,
            tcp_secs: 1000,
            udp_secs: 100,
            other_secs: 5,
        });
        let hit = FlowHit { generation: 0, rule: 0 };
        // Flows whose two buckets differ (of the table's two), so that
        // every choice is between both and the table fills evenly.
        let mut keys = (0..u16::MAX)
            .map(|port| flows.fingerprint(0, 17, (v4("10.0.0.1"), port), (v4("10.0.0.2"), 53)))
            .filter(|fp| {
                let [a, b] = flows.buckets(*fp);
                a != b
            });
        let first: Vec<u64> = keys.by_ref().take(16).collect();
        for (i, fp) in first.iter().enumerate() {
            flows.insert(*fp, 17, false, i as u32, hit);
        }
        let s = flows.stats(0);
        assert_eq!((s.flows, s.evicted, s.capacity), (16, 0, 16));
        // Full: the next one evicts the flow closest to expiry, the first.
        let next = keys.next().unwrap();
        flows.insert(next, 6, false, 8, hit);
        let s = flows.stats(8);
        assert_eq!((s.inserted, s.evicted), (17, 1));
        assert!(flows.find(next, 8).is_some());
        assert!(flows.find(first[0], 8).is_none());
        assert!(first[1..].iter().all(|fp| flows.find(*fp, 8).is_some()));
        // Expired entries are reused without eviction.
        let later = keys.next().unwrap();
        flows.insert(later, 17, false, 1000, hit);
        assert_eq!(flows.stats(1000).evicted, 1);
        assert!(flows.find(later, 1000).is_some());
    }

    #[test]
    fn counters_carry_over_a_rebuild_by_rule_text() {
        let a = policy(Action::Allow, vec![allow_443()]);
        a.counts[0].packets.store(5, Relaxed);
        a.counts[1].packets.store(7, Relaxed);
        let mut other = allow_443();
        other.text = "deny proto udp".into();
        let b = VnetPolicy::new(
            PolicyConfig {
                vnet: 0,
                default: Action::Allow,
                rules: vec![other, allow_443()],
            },
            Some(&a),
            2,
        );
        let got: Vec<u64> = b.counts.iter().map(|c| c.packets.load(Relaxed)).collect();
        assert_eq!(got, vec![0, 5, 7]);
    }
}

#[cfg(test)]
mod tally_tests {
    use super::*;

    #[test]
    fn a_batch_of_one_flow_is_counted_under_its_rule() {
        let pol = super::tests::udp_policy(None);
        let flows = FlowTable::new(FlowLimits::default());
        let p = super::tests::l4_packet(17, "10.1.0.2", "10.2.0.2", 5000, 7000, 0);
        let back = super::tests::l4_packet(17, "10.2.0.2", "10.1.0.2", 7000, 5000, 0);
        for _ in 0..3 {
            let mut t = RuleTally::default();
            for i in 0..10 {
                let ip = if i % 2 == 0 { &p } else { &back };
                let d = check(&pol, Some(&flows), 0, Ingress::Lan(0), ip, 10, false);
                assert!(d.passes(), "{d:?}");
                t.add(&pol, d, ip.len());
            }
            t.flush();
        }
        assert_eq!(pol.counts[0].packets.load(Relaxed), 30);
        assert_eq!(pol.counts[0].bytes.load(Relaxed), 30 * 40);
        assert_eq!(pol.established.load(Relaxed), 29);
    }
}

#[cfg(test)]
mod two_workers {
    use super::*;

    /// The two halves of each flow on two threads, as two workers on two
    /// queues would see them (RSS hashes a flow's directions apart): one
    /// thread sends the first packet of each flow, the other its reply,
    /// racing; every reply that comes after its flow's first packet
    /// passes, and none before it does.
    #[test]
    fn replies_handled_by_another_worker_pass_while_both_run() {
        let pol = super::tests::udp_policy(Some(Ingress::Lan(0)));
        let flows = FlowTable::new(FlowLimits {
            max_flows: 1 << 16,
            ..Default::default()
        });
        let udp = |s: &str, d: &str, sp: u16, dp: u16| super::tests::l4_packet(17, s, d, sp, dp, 0);
        const N: u16 = 20_000;
        let opened: Vec<AtomicU64> = (0..N).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..N {
                    let p = udp("10.1.0.2", "10.2.0.2", 10_000 + i, 53);
                    assert!(check(&pol, Some(&flows), 0, Ingress::Lan(0), &p, 7, false).passes());
                    opened[i as usize].store(1, std::sync::atomic::Ordering::Release);
                }
            });
            s.spawn(|| {
                let mut answered = 0;
                let t0 = std::time::Instant::now();
                while answered < N && t0.elapsed() < std::time::Duration::from_secs(20) {
                    for i in 0..N {
                        let was_open = opened[i as usize].load(std::sync::atomic::Ordering::Acquire) == 1;
                        let r = udp("10.2.0.2", "10.1.0.2", 53, 10_000 + i);
                        let d = check(&pol, Some(&flows), 0, Ingress::Peer(0), &r, 7, false);
                        if was_open {
                            assert_eq!(d, Decision::Established(Some(0)), "reply {i} after its flow opened");
                            answered += 1;
                        } else {
                            // Before (or while) it opens: refused, or passed
                            // if the other thread got there in between.
                            assert!(matches!(d, Decision::Denied(DEFAULT_RULE) | Decision::Established(_)));
                        }
                    }
                    if answered < N {
                        answered = 0;
                    }
                }
                assert_eq!(answered, N);
            });
        });
        assert_eq!(flows.stats(7).flows, N as u64);
        assert_eq!(flows.stats(7).evicted, 0);
    }
}
