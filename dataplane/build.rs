//! Builds the XDP program (ebpf/xdp) for the BPF target with the nightly
//! toolchain and bpf-linker, so `cargo build` produces one self-contained
//! binary with the program embedded.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/xdp");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/common/src")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "subway-xdp",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
