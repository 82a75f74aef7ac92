//! `[Policy]`: a VNET's ordered allow/deny rules and its default action.
//!
//! ```text
//! [Policy]
//! VNet = default            # which VNET (default: default)
//! Default = deny            # what no rule matches gets (default: allow)
//! Rule = allow in lan0 from 10.1.0.0/24 to 10.2.0.0/24 proto tcp port 443
//! Rule = allow in peer <KEY> proto icmp
//! Rule = deny proto udp port 5000-5999
//! ```
//!
//! A rule is an action then, in any order: `in IFACE` (a [Lan] of the
//! VNET) or `in peer KEY`, `from PREFIX`, `to PREFIX`, `proto tcp|udp|
//! icmp|icmpv6|any`, `port N` or `port N-M` (with tcp or udp). Omitted
//! parts match anything. The first matching rule decides; replies to an
//! allowed flow, and ICMP errors about it, pass on their own (stateful).

use super::values::ErrFn;
use super::{Config, ConfigError, Key32};
use ipnet::IpNet;
use subway_dataplane::policy::{Action, Proto};

/// Most rules in one VNET (the classifier's memory grows with the square).
pub const MAX_RULES: usize = 4096;

/// Where a rule's packets come from, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleFrom {
    Lan(String),
    Peer(Key32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub line: usize,
    /// The rule as written.
    pub text: String,
    pub action: Action,
    pub ingress: Option<RuleFrom>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub proto: Option<Proto>,
    pub ports: Option<(u16, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySection {
    pub line: usize,
    pub vnet: String,
    pub default: Action,
    pub rules: Vec<RuleSpec>,
}

const GRAMMAR: &str =
    "allow|deny [in IFACE | in peer KEY] [from PREFIX] [to PREFIX] [proto tcp|udp|icmp|icmpv6|any] [port N[-M]]";

fn prefix(word: &str, v: &str, line: usize, err: &ErrFn) -> Result<Option<IpNet>, ConfigError> {
    if v.eq_ignore_ascii_case("any") {
        return Ok(None);
    }
    let net = v
        .parse::<IpNet>()
        .or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            err(
                line,
                format!("`{word} {v}`: expected a prefix like 10.1.0.0/24 or fd01::/64, or any"),
            )
        })?;
    if net.trunc() != net {
        return Err(err(
            line,
            format!("`{word} {v}` has host bits set: write {}", net.trunc()),
        ));
    }
    Ok(Some(net))
}

/// One `Rule = ...` value.
pub(super) fn parse_rule(v: &str, line: usize, err: &ErrFn) -> Result<RuleSpec, ConfigError> {
    let words: Vec<&str> = v.split_whitespace().collect();
    let bad = |m: String| err(line, format!("Rule = {v}: {m}; a rule reads `{GRAMMAR}`"));
    let action = match words.first().map(|w| w.to_ascii_lowercase()) {
        Some(a) if a == "allow" || a == "accept" => Action::Allow,
        Some(a) if a == "deny" || a == "drop" => Action::Deny,
        _ => return Err(bad("it must start with allow or deny".into())),
    };
    let mut r = RuleSpec {
        line,
        text: words.join(" "),
        action,
        ingress: None,
        src: None,
        dst: None,
        proto: None,
        ports: None,
    };
    let mut i = 1;
    let mut seen: Vec<String> = Vec::new();
    while i < words.len() {
        let w = words[i].to_ascii_lowercase();
        let val = words
            .get(i + 1)
            .ok_or_else(|| bad(format!("`{}` needs a value after it", words[i])))?;
        if seen.contains(&w) {
            return Err(bad(format!("`{w}` is given twice")));
        }
        seen.push(w.clone());
        match w.as_str() {
            "in" if val.eq_ignore_ascii_case("peer") => {
                let key = words
                    .get(i + 2)
                    .ok_or_else(|| bad("`in peer` needs the peer's public key".into()))?;
                r.ingress = Some(RuleFrom::Peer(super::values::parse_key(
                    key,
                    "the peer key after `in peer`",
                    line,
                    err,
                )?));
                i += 1;
            }
            "in" => r.ingress = Some(RuleFrom::Lan(val.to_string())),
            "from" => r.src = prefix("from", val, line, err)?,
            "to" => r.dst = prefix("to", val, line, err)?,
            "proto" => {
                r.proto = match val.to_ascii_lowercase().as_str() {
                    "tcp" => Some(Proto::Tcp),
                    "udp" => Some(Proto::Udp),
                    "icmp" => Some(Proto::Icmp),
                    "icmpv6" | "ipv6-icmp" => Some(Proto::Icmpv6),
                    "any" => None,
                    other => {
                        return Err(bad(format!(
                            "unknown protocol {other}: use tcp, udp, icmp, icmpv6 or any"
                        )));
                    }
                }
            }
            "port" => {
                let (a, b) = val.split_once('-').unwrap_or((val, val));
                let (a, b) = match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) if a <= b => (a, b),
                    _ => return Err(bad(format!("`port {val}`: expected a port or a range like 5000-5999"))),
                };
                r.ports = Some((a, b));
            }
            _ => return Err(bad(format!("unknown word `{}`", words[i]))),
        }
        i += 2;
    }
    if r.ports.is_some() && !matches!(r.proto, Some(Proto::Tcp | Proto::Udp)) {
        return Err(err(
            line,
            format!("Rule = {v}: a port needs `proto tcp` or `proto udp` (ports are theirs)"),
        ));
    }
    let fam = |n: &Option<IpNet>| n.map(|n| matches!(n, IpNet::V6(_)));
    if let (Some(a), Some(b)) = (fam(&r.src), fam(&r.dst))
        && a != b
    {
        return Err(err(
            line,
            format!(
                "Rule = {v}: `from` and `to` are of different families (IPv4 and IPv6); a packet is one or the other: split the rule"
            ),
        ));
    }
    let v6 = fam(&r.src).or(fam(&r.dst));
    match (r.proto, v6) {
        (Some(Proto::Icmp), Some(true)) => {
            return Err(err(
                line,
                format!("Rule = {v}: proto icmp is IPv4's; with IPv6 prefixes write proto icmpv6"),
            ));
        }
        (Some(Proto::Icmpv6), Some(false)) => {
            return Err(err(
                line,
                format!("Rule = {v}: proto icmpv6 is IPv6's; with IPv4 prefixes write proto icmp"),
            ));
        }
        _ => {}
    }
    Ok(r)
}

pub(super) fn parse_policy(
    cfg: &mut Config,
    sline: usize,
    kv: super::sections::Entries,
    err: &ErrFn,
) -> Result<(), ConfigError> {
    let mut p = PolicySection {
        line: sline,
        vnet: "default".into(),
        default: Action::Allow,
        rules: Vec::new(),
    };
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "vnet" => p.vnet = super::values::vnet_name(&v, line, err)?,
            "default" => {
                p.default = match v.to_ascii_lowercase().as_str() {
                    "allow" | "accept" => Action::Allow,
                    "deny" | "drop" => Action::Deny,
                    _ => return Err(err(line, format!("Default = {v}: use allow or deny"))),
                }
            }
            "rule" => p.rules.push(parse_rule(&v, line, err)?),
            _ => {
                return Err(err(
                    line,
                    format!("unknown key `{k}` in [Policy]: expected VNet, Default, Rule"),
                ));
            }
        }
    }
    if p.rules.len() > MAX_RULES {
        return Err(err(
            sline,
            format!(
                "{} rules in one [Policy]: at most {MAX_RULES} per VNET (use prefixes that cover several)",
                p.rules.len()
            ),
        ));
    }
    if let Some(prev) = cfg.policies.iter().find(|q| q.vnet == p.vnet) {
        return Err(err(
            sline,
            format!(
                "a second [Policy] for VNET {} (the first is at line {}): merge them",
                p.vnet, prev.line
            ),
        ));
    }
    cfg.policies.push(p);
    Ok(())
}

/// Whether rule `a` matches every packet rule `b` matches.
fn covers(a: &RuleSpec, b: &RuleSpec) -> bool {
    let net = |x: &Option<IpNet>, y: &Option<IpNet>| match (x, y) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => x.contains(y),
    };
    (a.ingress.is_none() || a.ingress == b.ingress)
        && net(&a.src, &b.src)
        && net(&a.dst, &b.dst)
        && (a.proto.is_none() || a.proto == b.proto)
        && match (a.ports, b.ports) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((a0, a1)), Some((b0, b1))) => a0 <= b0 && b1 <= a1,
        }
}

impl Config {
    /// Rules that span sections: the VNET exists, `in` names one of its
    /// LANs or peers. Returns the warnings: rules that never match
    /// (shadowed by an earlier one, or a prefix outside the VNET).
    pub(super) fn check_policies(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        let vnets = self.vnet_ids();
        for p in &self.policies {
            if !vnets.contains(&p.vnet) {
                return Err(self.err(
                    p.line,
                    format!(
                        "[Policy] for VNET {}, which no [Lan] or [Peer] has (VNETs: {})",
                        p.vnet,
                        vnets.join(", ")
                    ),
                ));
            }
            // The prefixes this VNET routes, if the config says them all.
            let lans: Vec<&super::LanSection> = self.lans.iter().filter(|l| l.vnet == p.vnet).collect();
            let known = lans.iter().all(|l| !l.subnets.is_empty());
            let mut nets: Vec<IpNet> = lans
                .iter()
                .flat_map(|l| l.subnets.iter().copied().chain(l.routes.iter().map(|r| r.0)))
                .collect();
            nets.extend(
                self.peers
                    .iter()
                    .filter(|q| q.vnet == p.vnet)
                    .flat_map(|q| q.allowed_ips.iter().map(|a| a.0)),
            );
            let inside = |n: &IpNet| nets.iter().any(|m| m.contains(n) || n.contains(m));
            for (j, r) in p.rules.iter().enumerate() {
                match &r.ingress {
                    Some(RuleFrom::Lan(name)) if !lans.iter().any(|l| &l.interface == name) => {
                        return Err(self.err(
                            r.line,
                            format!(
                                "`in {name}`: not a [Lan] of VNET {} ({}): name one of its LAN interfaces, or `in peer KEY`",
                                p.vnet,
                                lans.iter().map(|l| l.interface.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        ));
                    }
                    Some(RuleFrom::Peer(key)) => match self.peers.iter().find(|q| q.public_key == *key) {
                        None => {
                            return Err(self.err(
                                r.line,
                                format!(
                                    "`in peer {}`: no [Peer] has this PublicKey: add the peer or fix the key",
                                    key.to_base64()
                                ),
                            ));
                        }
                        Some(q) if q.vnet != p.vnet => {
                            return Err(self.err(
                                r.line,
                                format!(
                                    "`in peer {}`: that peer is in VNET {}, this [Policy] is VNET {}'s",
                                    key.to_base64(),
                                    q.vnet,
                                    p.vnet
                                ),
                            ));
                        }
                        Some(_) => {}
                    },
                    _ => {}
                }
                let where_ = format!("{}:{}", self.path.display(), r.line);
                if let Some(i) = p.rules[..j].iter().position(|e| covers(e, r)) {
                    warnings.push(format!(
                        "{where_}: this rule never matches: the rule at line {} takes all its packets first",
                        p.rules[i].line
                    ));
                }
                for (word, n) in [("from", r.src), ("to", r.dst)] {
                    if let Some(n) = n
                        && known
                        && !inside(&n)
                    {
                        warnings.push(format!(
                            "{where_}: `{word} {n}` is outside VNET {}'s prefixes (its LAN Subnets and Routes, its peers' AllowedIPs): the rule can never match",
                            p.vnet
                        ));
                    }
                }
            }
        }
        Ok(warnings)
    }
}
