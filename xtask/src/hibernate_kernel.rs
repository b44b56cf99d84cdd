//! The newer guest kernel the hibernation test boots
//! (`crates/vmm/tests/nested_linux_hibernate.rs`).
//!
//! Linux 6.13 and later end a hibernation with PSCI SYSTEM_OFF2(HIBERNATE_OFF); the
//! harness's 6.12 kernel uses SYSTEM_OFF. Debian's `trixie-backports` suite carries arm64
//! cloud kernels 6.16 and 6.17: this downloads the newest 6.17 one through a private apt
//! configuration (its own sources list and package lists under
//! `target/nested/apt-trixie-backports/`, so the host's apt sources stay as they are) and
//! keeps its `Image` and its `virtio_mmio`/`virtio_blk` modules (uncompressed) in
//! `target/nested/assets/hibernate/`. The test boots with whichever kernel it is given
//! and checks the power-off call that kernel makes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::run_checked;
use crate::provision::{self, GUEST_MODULES};

/// The kernel series taken from trixie-backports.
const SERIES: &str = "6.17";

/// `<assets>/hibernate`.
pub fn dir() -> PathBuf {
    provision::assets_dir().join("hibernate")
}

/// The cached newer kernel: its `Image` and its modules' directory, when complete.
pub fn cached() -> Option<(PathBuf, PathBuf)> {
    let dir = dir();
    let image = dir.join("Image");
    let modules = dir.join("modules");
    let files = provision::module_files(&modules);
    let complete = image.is_file()
        && dir.join("kernel-version").is_file()
        && files.len() == GUEST_MODULES.len()
        && files.iter().all(|f| f.is_file());
    complete.then_some((image, modules))
}

/// apt options that use only our sources list and package lists.
fn apt_options(apt: &Path) -> Vec<String> {
    vec![
        "-o".into(),
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-o".into(),
        format!(
            "Dir::Etc::SourceParts={}",
            apt.join("sources.list.d").display()
        ),
        "-o".into(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        "-o".into(),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "-o".into(),
        "APT::Architecture=arm64".into(),
        "-o".into(),
        "APT::Architectures=arm64".into(),
    ]
}

/// Downloads and unpacks the newer kernel unless it is cached.
pub fn ensure() -> Result<()> {
    if cached().is_some() {
        return Ok(());
    }
    let apt = paths::nested_dir().join("apt-trixie-backports");
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(apt.join(sub))?;
    }
    fs::write(
        apt.join("sources.list"),
        format!(
            "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} \
             trixie-backports main\n",
            provision::debian_mirror()
        ),
    )?;
    let options = apt_options(&apt);
    eprintln!(
        "setup: apt-get update (trixie-backports, private lists in {})",
        apt.display()
    );
    provision::retry(2, || {
        run_checked(
            Command::new("apt-get").args(&options).arg("update"),
            Duration::from_secs(600),
            "apt-get update of trixie-backports failed; check the Debian mirror is reachable",
        )
        .map(drop)
    })?;
    let pattern = format!(
        r"^linux-image-{}\.[0-9.]*\+deb[0-9]*-cloud-arm64$",
        SERIES.replace('.', r"\.")
    );
    let found = run_checked(
        Command::new("apt-cache")
            .args(&options)
            .args(["search", "--names-only", &pattern]),
        Duration::from_secs(60),
        "apt-cache could not search the trixie-backports lists",
    )?;
    let Some(package) = provision::newest_kernel_in(&found.output) else {
        bail!("trixie-backports offers no linux-image-{SERIES}.*-cloud-arm64 package");
    };
    let dir = dir();
    fs::create_dir_all(&dir)?;
    let work = dir.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    eprintln!("setup: downloading {package}:arm64 for the hibernation test");
    provision::retry(3, || {
        run_checked(
            Command::new("apt-get")
                .args(&options)
                .args(["download", &format!("{package}:arm64")])
                .current_dir(&work),
            Duration::from_secs(900),
            "apt-get download failed; check the Debian mirror is reachable",
        )
        .map(drop)
    })?;
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let root = work.join("root");
    run_checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        Duration::from_secs(300),
        &format!("could not unpack {}", deb.display()),
    )?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{package} contains no /boot/vmlinuz-{release}");
    }
    // trixie ships modules under /usr/lib (merged /usr), bookworm under /lib.
    let tree = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|base| root.join(base).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("{package} contains no modules for {release}"))?;
    let modules = work.join("modules");
    fs::create_dir_all(&modules)?;
    for module in GUEST_MODULES {
        let packed = tree.join(format!("{module}.xz"));
        let name = Path::new(module)
            .file_name()
            .with_context(|| format!("module path {module} has no file name"))?;
        run_checked(
            Command::new("xz").arg("-d").arg("-f").arg(&packed),
            Duration::from_secs(60),
            &format!(
                "could not decompress {} (is xz-utils installed?)",
                packed.display()
            ),
        )?;
        fs::rename(packed.with_extension(""), modules.join(name))?;
    }
    let _ = fs::remove_dir_all(dir.join("modules"));
    fs::rename(&modules, dir.join("modules"))?;
    fs::rename(&vmlinuz, dir.join("Image"))?;
    let version = work.join("kernel-version");
    fs::write(&version, format!("{release}\n"))?;
    fs::rename(&version, dir.join("kernel-version"))?;
    fs::remove_dir_all(&work)?;
    Ok(())
}
