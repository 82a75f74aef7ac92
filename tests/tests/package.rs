//! The Debian package, as an operator gets it: built with the one command
//! the README gives (control/dist/build-deb.sh, cargo-deb), its metadata
//! and contents checked, unpacked into a temporary root, the packaged
//! binary run against the packaged example config, the packaged units
//! verified by systemd, the man pages rendered, the bash completion run.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use subway_testkit::{Netns, require_root, unique, veth, wg_keypair, which, work_dir};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the package into a directory of its own; returns the .deb.
fn build() -> Result<PathBuf> {
    let out = work_dir().join(unique("deb"));
    std::fs::create_dir_all(&out)?;
    run(Command::new(workspace().join("control/dist/build-deb.sh"))
        .arg("--output")
        .arg(&out)
        .current_dir(workspace()))?;
    std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("build-deb.sh made no .deb")
}

#[test]
fn the_debian_package_installs_a_working_gateway_with_its_docs() -> Result<()> {
    if !require_root("the_debian_package_installs_a_working_gateway_with_its_docs") {
        return Ok(());
    }
    if which("cargo-deb").is_err() && !Path::new(&format!("{}/.cargo/bin/cargo-deb", env!("HOME"))).exists() {
        bail!("cargo-deb is missing: ./setup.sh installs it");
    }
    let deb = build()?;

    // Metadata: what it is, what it needs, its maintainer scripts.
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb))?;
    for want in [
        "Package: subway",
        "Section: net",
        "nftables",
        "iproute2",
        "postinst",
        "prerm",
        "postrm",
    ] {
        assert!(info.contains(want), "dpkg-deb --info lacks {want}:\n{info}");
    }
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    for want in [
        "./usr/sbin/subway",
        "./lib/systemd/system/subway@.service",
        "./lib/systemd/system/subway-fence@.service",
        "./usr/share/doc/subway/examples/example.conf",
        "./usr/share/doc/subway/examples/keepalived-subway.conf",
        "./usr/share/doc/subway/examples/bird-subway.conf",
        "./usr/share/man/man8/subway.8.gz",
        "./usr/share/man/man8/subway-route.8.gz",
        "./usr/share/man/man5/subway.conf.5.gz",
        "./usr/share/bash-completion/completions/subway",
        "./usr/share/zsh/vendor-completions/_subway",
        "./usr/share/fish/vendor_completions.d/subway.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(want)),
            "the package lacks {want}:\n{contents}"
        );
    }
    // The postinst starts nothing and creates /etc/subway root-only.
    let ctl = work_dir().join(unique("debctl"));
    run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&ctl))?;
    let postinst = std::fs::read_to_string(ctl.join("postinst"))?;
    assert!(postinst.contains("install -d -m 0700 /etc/subway"), "{postinst}");
    assert!(
        !postinst.contains("systemctl start") && !postinst.contains("systemctl enable"),
        "{postinst}"
    );

    // Unpacked into a temporary root: the binary runs.
    let root = work_dir().join(unique("debroot"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let bin = root.join("usr/sbin/subway");
    let version = run(Command::new(&bin).arg("--version"))?;
    assert!(version.starts_with("subway "), "{version}");

    // The example config as shipped is refused, naming the line to edit;
    // edited as its comments say, it passes `subway check` on a box with
    // its interfaces.
    let example = root.join("usr/share/doc/subway/examples/example.conf");
    let out = Command::new(&bin).arg("check").arg("--config").arg(&example).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("example.conf:8:"), "{err}");
    let (me, peer) = (wg_keypair()?, wg_keypair()?);
    let edited = std::fs::read_to_string(&example)?
        .replace("REPLACE_WITH_wg_genkey_OUTPUT", &me.0)
        .replace("REPLACE_WITH_THE_OTHER_SITE_PUBLIC_KEY", &peer.1);
    let conf = work_dir().join(format!("{}.conf", unique("site")));
    std::fs::write(&conf, edited)?;
    let (ns, other) = (Netns::new("pkg")?, Netns::new("pkgo")?);
    veth(&ns, "eth0", &other, "eth0")?;
    veth(&ns, "eth1", &other, "eth1")?;
    let ok = ns.run(&[bin.to_str().unwrap(), "check", "--config", conf.to_str().unwrap()])?;
    assert!(ok.contains(": ok"), "{ok}");

    // The packaged units verify (pointing at the unpacked binary).
    if let Ok(analyze) = which("systemd-analyze") {
        let dir = work_dir().join(unique("units"));
        std::fs::create_dir_all(&dir)?;
        for unit in ["subway@.service", "subway-fence@.service"] {
            let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit))?;
            assert!(
                text.contains("/usr/sbin/subway "),
                "{unit} does not run the packaged binary"
            );
            let path = dir.join(unit.replace("@.", "@site-a."));
            std::fs::write(&path, text.replace("/usr/sbin/subway", bin.to_str().unwrap()))?;
            let out = Command::new(&analyze).arg("verify").arg(&path).output()?;
            let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
        }
    } else {
        eprintln!("no systemd-analyze here: the units are verified by failsafe.rs where it exists");
    }

    // Both man pages render.
    for page in ["usr/share/man/man8/subway.8.gz", "usr/share/man/man5/subway.conf.5.gz"] {
        let text = run(Command::new("man")
            .arg("-l")
            .arg(root.join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"))?;
        assert!(text.contains("NAME") && text.contains("subway"), "{page}:\n{text}");
    }
    let conf5 = run(Command::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man5/subway.conf.5.gz"))
        .env("MANPAGER", "cat"))?;
    assert!(
        conf5.contains("VirtualAddress") && conf5.contains("ProbeInterval"),
        "{conf5}"
    );

    // The bash completion loads and completes `subway ro<TAB>`.
    let comp = root.join("usr/share/bash-completion/completions/subway");
    run(Command::new("bash").arg("-n").arg(&comp))?;
    let got = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(subway ro); COMP_CWORD=1; COMP_LINE='subway ro'; COMP_POINT=9; \
         _subway subway ro subway; echo \"${{COMPREPLY[@]}}\"",
        comp.display()
    )))?;
    assert_eq!(got.trim(), "route", "bash completion of `subway ro`");
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
