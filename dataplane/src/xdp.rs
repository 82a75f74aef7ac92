//! Loads subway's XDP program, keeps its maps in step with the
//! configuration, and attaches it to interfaces. Dropping [`XdpSteering`]
//! detaches every link it made. Attachments are bpf_links owned by this
//! process, so if the process dies the kernel detaches them too, and
//! traffic flows through the kernel as if subway had never been there.

use crate::error::{Context, Error, Result};
use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use ipnet::IpNet;
use std::os::fd::AsRawFd;
use subway_common::{IfaceConf, ListenKey, Steer, V4Key, V6Key, XdpCounter, lpm_len, maps};

/// The XDP program, built by build.rs from `ebpf/xdp`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/subway-xdp"));

/// How to attach the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// Driver (native) mode if the NIC supports it, else generic.
    #[default]
    Auto,
    Driver,
    Generic,
}

impl std::str::FromStr for XdpAttach {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(XdpAttach::Auto),
            "driver" | "native" | "drv" => Ok(XdpAttach::Driver),
            "generic" | "skb" => Ok(XdpAttach::Generic),
            _ => Err(format!("unknown XDP mode {s:?}: use auto, driver or generic")),
        }
    }
}

pub struct XdpSteering {
    ebpf: Ebpf,
    attached: Vec<(String, aya::programs::xdp::XdpLinkId)>,
}

impl XdpSteering {
    /// Loads the program and its maps into the kernel (not attached yet).
    pub fn load() -> Result<Self> {
        let mut ebpf =
            Ebpf::load(XDP_OBJECT).xdp(|| "loading the XDP object (is this root, with bpffs and BTF?)".into())?;
        let prog: &mut Xdp = program(&mut ebpf)?;
        prog.load().xdp(|| "verifying the XDP program".into())?;
        Ok(XdpSteering {
            ebpf,
            attached: Vec::new(),
        })
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Xdp(format!("XDP object has no map {name}")))
    }

    pub fn set_iface(&mut self, ifindex: u32, conf: IfaceConf) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, IfaceConf> =
            HashMap::try_from(self.map_mut(maps::IFACES)?).xdp(|| "IFACES map".into())?;
        m.insert(ifindex, conf, 0)
            .xdp(|| format!("registering ifindex {ifindex}"))
    }

    /// Adds (or replaces) a steering route in `vnet`.
    pub fn set_route(&mut self, vnet: u32, prefix: IpNet, steer: Steer) -> Result<()> {
        let prefix = prefix.trunc();
        match prefix {
            IpNet::V4(n) => {
                let mut m: LpmTrie<&mut MapData, V4Key, Steer> =
                    LpmTrie::try_from(self.map_mut(maps::ROUTES_V4)?).xdp(|| "ROUTES_V4 map".into())?;
                let key = v4_key(vnet, n);
                m.insert(&key, steer, 0).xdp(|| format!("steering {prefix}"))
            }
            IpNet::V6(n) => {
                let mut m: LpmTrie<&mut MapData, V6Key, Steer> =
                    LpmTrie::try_from(self.map_mut(maps::ROUTES_V6)?).xdp(|| "ROUTES_V6 map".into())?;
                let key = v6_key(vnet, n);
                m.insert(&key, steer, 0).xdp(|| format!("steering {prefix}"))
            }
        }
    }

    /// Removes a steering route from `vnet` (absent: nothing to do).
    pub fn remove_route(&mut self, vnet: u32, prefix: IpNet) -> Result<()> {
        let prefix = prefix.trunc();
        let r = match prefix {
            IpNet::V4(n) => {
                let mut m: LpmTrie<&mut MapData, V4Key, Steer> =
                    LpmTrie::try_from(self.map_mut(maps::ROUTES_V4)?).xdp(|| "ROUTES_V4 map".into())?;
                let key = v4_key(vnet, n);
                m.remove(&key)
            }
            IpNet::V6(n) => {
                let mut m: LpmTrie<&mut MapData, V6Key, Steer> =
                    LpmTrie::try_from(self.map_mut(maps::ROUTES_V6)?).xdp(|| "ROUTES_V6 map".into())?;
                let key = v6_key(vnet, n);
                m.remove(&key)
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(Error::Xdp(format!("unsteering {prefix}: {e}"))),
        }
    }

    pub fn add_listen(&mut self, key: ListenKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, ListenKey, u32> =
            HashMap::try_from(self.map_mut(maps::LISTEN)?).xdp(|| "LISTEN map".into())?;
        m.insert(key, 1, 0).xdp(|| format!("listen port {}", key.port))
    }

    pub fn remove_listen(&mut self, key: ListenKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, ListenKey, u32> =
            HashMap::try_from(self.map_mut(maps::LISTEN)?).xdp(|| "LISTEN map".into())?;
        match m.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(Error::Xdp(format!("listen port {}: {e}", key.port))),
        }
    }

    /// Points XSKMAP slot `index` at an AF_XDP socket.
    pub fn set_xsk(&mut self, index: u32, fd: &impl AsRawFd) -> Result<()> {
        let mut m: XskMap<&mut MapData> = XskMap::try_from(self.map_mut(maps::XSKS)?).xdp(|| "XSKS map".into())?;
        m.set(index, fd.as_raw_fd(), 0).xdp(|| format!("XSKMAP slot {index}"))
    }

    /// Attaches to `ifname`; returns the mode that worked.
    pub fn attach(&mut self, ifname: &str, want: XdpAttach) -> Result<&'static str> {
        let prog: &mut Xdp = program(&mut self.ebpf)?;
        let tries: &[(XdpMode, &'static str)] = match want {
            XdpAttach::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "generic")],
            XdpAttach::Driver => &[(XdpMode::Driver, "driver")],
            XdpAttach::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for (mode, name) in tries {
            match prog.attach(ifname, *mode) {
                Ok(id) => {
                    self.attached.push((ifname.to_string(), id));
                    return Ok(name);
                }
                Err(e) => last = Some(format!("{name} mode: {e}")),
            }
        }
        Err(Error::Xdp(format!(
            "attaching XDP to {ifname}: {}",
            last.unwrap_or_default()
        )))
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        let Ok(prog) = program(&mut self.ebpf) else { return };
        for (ifname, id) in self.attached.drain(..) {
            if let Err(e) = prog.detach(id) {
                tracing::warn!(%ifname, "detaching XDP: {e}");
            }
        }
    }

    /// Runs the loaded program once on `frame` as if it arrived on
    /// `ifindex`, RX queue 0 (BPF_PROG_TEST_RUN, in the caller's network
    /// namespace; the interface must have an XDP program attached so that
    /// its queue is registered). Returns the XDP action (XDP_PASS = 2,
    /// XDP_REDIRECT = 4, ...). The redirect itself is not performed: this
    /// tests the classification, on the real program and its real maps.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> Result<u32> {
        use std::os::fd::AsFd;
        let p = self
            .ebpf
            .program(subway_common::PROGRAM_NAME)
            .ok_or_else(|| Error::Xdp("XDP object has no program subway_xdp".into()))?;
        let fd = p.fd().xdp(|| "the XDP program's fd".into())?.as_fd().as_raw_fd();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let mut out = vec![0u8; frame.len() + 256];
        // The test part of union bpf_attr (linux/bpf.h), in order.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        let mut attr = TestRun {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: std::mem::size_of_val(&ctx) as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: bpf(2) reads `attr` (of the size given) and the buffers it
        // points to, which outlive the call; it writes only `attr` and `out`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>() as u32,
            )
        };
        if r != 0 {
            return Err(Error::io(
                "BPF_PROG_TEST_RUN of the XDP program",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(attr.retval)
    }

    /// The program's counters, summed over CPUs, indexed by [`XdpCounter`].
    pub fn counters(&self) -> Result<[u64; XdpCounter::COUNT]> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or_else(|| Error::Xdp("XDP object has no COUNTERS map".into()))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).xdp(|| "COUNTERS map".into())?;
        let mut out = [0u64; XdpCounter::COUNT];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = arr.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        Ok(out)
    }
}

impl Drop for XdpSteering {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let p = ebpf
        .program_mut(subway_common::PROGRAM_NAME)
        .ok_or_else(|| Error::Xdp("XDP object has no program subway_xdp".into()))?;
    p.try_into().xdp(|| "subway_xdp is not an XDP program".into())
}

/// The LPM key of an IPv4 prefix in a VNET.
fn v4_key(vnet: u32, n: ipnet::Ipv4Net) -> Key<V4Key> {
    Key::new(
        lpm_len(n.prefix_len() as u32),
        V4Key {
            vnet,
            addr: n.addr().octets(),
        },
    )
}

/// The LPM key of an IPv6 prefix in a VNET.
fn v6_key(vnet: u32, n: ipnet::Ipv6Net) -> Key<V6Key> {
    Key::new(
        lpm_len(n.prefix_len() as u32),
        V6Key {
            vnet,
            addr: n.addr().octets(),
        },
    )
}
