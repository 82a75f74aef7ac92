//! subway's XDP program. It decides one thing per frame: does the userspace
//! dataplane take it (redirect into the AF_XDP socket of this interface and
//! RX queue) or does the kernel (XDP_PASS)? It never drops: anything it does
//! not understand, and any frame whose socket is missing, goes to the kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, XskMap, lpm_trie::Key},
    programs::XdpContext,
};
use subway_common::{
    IfaceConf, ListenKey, MAX_IFACES, MAX_LISTEN, MAX_ROUTES, STEER_LOCAL, Steer, V4Key, V6Key, XSK_SLOTS, XdpCounter,
    lpm_len,
};

#[map]
static IFACES: HashMap<u32, IfaceConf> = HashMap::with_max_entries(MAX_IFACES, 0);
#[map]
static ROUTES_V4: LpmTrie<V4Key, Steer> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static ROUTES_V6: LpmTrie<V6Key, Steer> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static LISTEN: HashMap<ListenKey, u32> = HashMap::with_max_entries(MAX_LISTEN, 0);
#[map]
static XSKS: XskMap = XskMap::with_max_entries(XSK_SLOTS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XdpCounter::COUNT as u32, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

#[xdp]
pub fn subway_xdp(ctx: XdpContext) -> u32 {
    count(XdpCounter::Seen);
    let verdict = classify(&ctx);
    match verdict {
        Verdict::Pass(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
        Verdict::Redirect(index, reason, isolated) => {
            // The fallback action (low bits of flags) is XDP_PASS: with no
            // socket at this index the kernel gets the frame, not a black
            // hole. Except in non-default VNETs, which the kernel's single
            // routing table cannot keep apart: there it is a drop.
            let fallback = if isolated {
                xdp_action::XDP_DROP
            } else {
                xdp_action::XDP_PASS
            };
            match XSKS.redirect(index, fallback as u64) {
                Ok(action) => {
                    count(reason);
                    action
                }
                Err(_) if isolated => {
                    count(XdpCounter::DropVnetNoSocket);
                    xdp_action::XDP_DROP
                }
                Err(_) => {
                    count(XdpCounter::PassNoSocket);
                    xdp_action::XDP_PASS
                }
            }
        }
    }
}

enum Verdict {
    Pass(XdpCounter),
    Drop(XdpCounter),
    /// To the AF_XDP socket at this index; the bool: a non-default VNET.
    Redirect(u32, XdpCounter, bool),
}

#[inline(always)]
fn count(c: XdpCounter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        unsafe { *p += 1 };
    }
}

/// A bounds-checked pointer to a `T` at `off` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read_u16_be(ctx: &XdpContext, off: usize) -> Option<u16> {
    let p = ptr_at::<[u8; 2]>(ctx, off)?;
    // SAFETY: ptr_at checked that two bytes are inside the frame.
    let b = unsafe { *p };
    Some(u16::from_be_bytes(b))
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is plain data and only read.
    let iface = match unsafe { IFACES.get(&ifindex) } {
        Some(c) => *c,
        None => return Verdict::Pass(XdpCounter::PassUnknownIface),
    };

    // Ethernet: ours, unicast or not at all.
    let dst = match ptr_at::<[u8; 6]>(ctx, 0) {
        // SAFETY: 6 bytes checked to be inside the frame.
        Some(p) => unsafe { *p },
        None => return Verdict::Pass(XdpCounter::PassMalformed),
    };
    if dst != iface.mac {
        // Broadcast and multicast (ARP, NDP) are the kernel's too.
        return Verdict::Pass(if dst[0] & 1 == 1 {
            XdpCounter::PassMulticast
        } else {
            XdpCounter::PassNotForUs
        });
    }
    let off = ETH_HLEN;
    let proto = match read_u16_be(ctx, 12) {
        Some(p) => p,
        None => return Verdict::Pass(XdpCounter::PassMalformed),
    };
    // VLANs will map to VNETs; until then tagged frames stay in the kernel.
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Verdict::Pass(XdpCounter::PassVlan);
    }

    let queue = ctx.rx_queue_index();
    if queue >= subway_common::MAX_QUEUES {
        return if iface.isolated() {
            Verdict::Drop(XdpCounter::DropVnetNoSocket)
        } else {
            Verdict::Pass(XdpCounter::PassQueueRange)
        };
    }
    match proto {
        ETH_P_IP => classify_v4(ctx, off, ifindex, iface, queue),
        ETH_P_IPV6 => classify_v6(ctx, off, ifindex, iface, queue),
        _ => Verdict::Pass(XdpCounter::PassNotIp),
    }
}

#[inline(always)]
fn classify_v4(ctx: &XdpContext, off: usize, ifindex: u32, iface: IfaceConf, queue: u32) -> Verdict {
    let hdr = match ptr_at::<[u8; 20]>(ctx, off) {
        // SAFETY: 20 bytes checked to be inside the frame.
        Some(p) => unsafe { *p },
        None => return Verdict::Pass(XdpCounter::PassMalformed),
    };
    let ihl = (hdr[0] & 0x0f) as usize;
    if hdr[0] >> 4 != 4 || ihl < 5 {
        return Verdict::Pass(XdpCounter::PassMalformed);
    }
    let dst = [hdr[16], hdr[17], hdr[18], hdr[19]];
    let isolated = iface.isolated();
    if dst[0] >= 224 {
        return if isolated {
            Verdict::Drop(XdpCounter::DropVnetLocal)
        } else {
            Verdict::Pass(XdpCounter::PassMulticast)
        };
    }

    // WireGuard to us: UDP, unfragmented, to a listen address. Fragments
    // go to the kernel, which reassembles them for the control thread.
    // Never from a non-default VNET: the uplink is the default VNET's.
    let fragmented = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff != 0;
    if hdr[9] == IPPROTO_UDP && !fragmented && !isolated {
        let l4 = off + ihl * 4;
        if let Some(port) = read_u16_be(ctx, l4 + 2) {
            if is_listen(ListenKey::v4(dst, port), port) {
                return listen_verdict(ctx, l4, iface, queue);
            }
        }
    }

    let key = Key::new(
        lpm_len(32),
        V4Key {
            vnet: iface.vnet,
            addr: dst,
        },
    );
    match ROUTES_V4.get(&key) {
        Some(steer) => steer_verdict(steer, hdr[8], ifindex, iface, queue, false),
        None => no_route(iface),
    }
}

#[inline(always)]
fn classify_v6(ctx: &XdpContext, off: usize, ifindex: u32, iface: IfaceConf, queue: u32) -> Verdict {
    let hdr = match ptr_at::<[u8; 40]>(ctx, off) {
        // SAFETY: 40 bytes checked to be inside the frame.
        Some(p) => unsafe { *p },
        None => return Verdict::Pass(XdpCounter::PassMalformed),
    };
    if hdr[0] >> 4 != 6 {
        return Verdict::Pass(XdpCounter::PassMalformed);
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    let isolated = iface.isolated();
    // Neighbour discovery (ICMPv6 133-137) and MLD (behind a hop-by-hop
    // header) are what a non-default VNET's interface answers.
    let icmp_type = match ptr_at::<u8>(ctx, off + 40) {
        // SAFETY: 1 byte checked to be inside the frame.
        Some(p) => unsafe { *p },
        None => 0,
    };
    let nd = hdr[6] == IPPROTO_ICMPV6 && (133..=137).contains(&icmp_type);
    if dst[0] == 0xff {
        return if isolated && !nd && hdr[6] != 0 {
            Verdict::Drop(XdpCounter::DropVnetLocal)
        } else {
            Verdict::Pass(XdpCounter::PassMulticast)
        };
    }
    // Link-local destinations (fe80::/10) never leave the link.
    if dst[0] == 0xfe && (dst[1] & 0xc0) == 0x80 {
        return Verdict::Pass(XdpCounter::PassLocal);
    }

    if hdr[6] == IPPROTO_UDP && !isolated {
        if let Some(port) = read_u16_be(ctx, off + 40 + 2) {
            if is_listen(ListenKey::v6(dst, port), port) {
                return listen_verdict(ctx, off + 40, iface, queue);
            }
        }
    }

    let key = Key::new(
        lpm_len(128),
        V6Key {
            vnet: iface.vnet,
            addr: dst,
        },
    );
    match ROUTES_V6.get(&key) {
        Some(steer) => steer_verdict(steer, hdr[7], ifindex, iface, queue, nd),
        None => no_route(iface),
    }
}

/// WireGuard data messages (type 4) go to the workers; handshake and
/// cookie messages to the kernel, where the control thread's UDP socket
/// reads them.
#[inline(always)]
fn listen_verdict(ctx: &XdpContext, l4: usize, iface: IfaceConf, queue: u32) -> Verdict {
    match ptr_at::<u8>(ctx, l4 + 8) {
        // SAFETY: one byte checked to be inside the frame.
        Some(p) if unsafe { *p } == 4 => {
            Verdict::Redirect(queue_index(iface, queue), XdpCounter::RedirectListen, false)
        }
        _ => Verdict::Pass(XdpCounter::PassHandshake),
    }
}

#[inline(always)]
fn is_listen(exact: ListenKey, port: u16) -> bool {
    // SAFETY: plain data, only read.
    unsafe { LISTEN.get(&exact).is_some() || LISTEN.get(&ListenKey::any(port)).is_some() }
}

#[inline(always)]
fn steer_verdict(steer: &Steer, ttl: u8, ifindex: u32, iface: IfaceConf, queue: u32, nd: bool) -> Verdict {
    let isolated = iface.isolated();
    if steer.action == STEER_LOCAL {
        return if isolated && !nd {
            Verdict::Drop(XdpCounter::DropVnetLocal)
        } else {
            Verdict::Pass(XdpCounter::PassLocal)
        };
    }
    // A non-default VNET's packets never reach the kernel's forwarding:
    // the worker decides, and counts, what the kernel would have done.
    if !isolated {
        if steer.egress_ifindex == ifindex {
            return Verdict::Pass(XdpCounter::PassSameIface);
        }
        if ttl <= 1 {
            return Verdict::Pass(XdpCounter::PassTtlExpired);
        }
    }
    Verdict::Redirect(queue_index(iface, queue), XdpCounter::RedirectRoute, isolated)
}

#[inline(always)]
fn no_route(iface: IfaceConf) -> Verdict {
    if iface.isolated() {
        Verdict::Drop(XdpCounter::DropVnetNoRoute)
    } else {
        Verdict::Pass(XdpCounter::PassNoRoute)
    }
}

/// XSKMAP index; `queue` was checked against MAX_QUEUES in classify.
#[inline(always)]
fn queue_index(iface: IfaceConf, queue: u32) -> u32 {
    iface.slot * subway_common::MAX_QUEUES + (queue & (subway_common::MAX_QUEUES - 1))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
