//! What the host needs before anything runs on arm64 KVM, installed when missing.
//!
//! On an arm64 Linux host with a usable `/dev/kvm` nothing is needed: KVM code runs natively.
//! Elsewhere (x86_64 Debian, our machines) the nested machine needs:
//! - `qemu-system-aarch64` 10.x (Debian `bookworm-backports` package `qemu-system-arm`),
//! - the arm64 6.12 cloud kernel and `busybox-static`, downloaded as Debian arm64 packages and
//!   unpacked (never installed) into `<target>/nested/assets`.
//!
//! Both paths also need the rustup targets `aarch64-unknown-linux-musl` (test binaries) and
//! `aarch64-unknown-none` (bare-metal guests). Every step checks the state first, so a warm run
//! makes no network request.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{run_captured, run_checked};

/// Rust targets the project builds for besides the host.
pub const RUST_TARGETS: [&str; 2] = ["aarch64-unknown-linux-musl", "aarch64-unknown-none"];

/// The target KVM test binaries are built for.
pub const KVM_TEST_TARGET: &str = "aarch64-unknown-linux-musl";

/// Oldest QEMU we accept without trying to install a newer one (older builds are 2-3x slower).
const QEMU_MIN_MAJOR: u32 = 10;

/// Where KVM code runs on this host.
#[derive(Debug, Clone)]
pub enum Host {
    /// arm64 Linux with `/dev/kvm`: run directly.
    Native,
    /// Anything else: inside an emulated arm64 machine with EL2, under QEMU.
    Nested(NestedAssets),
}

impl Host {
    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            Host::Native => "native arm64 KVM".to_string(),
            Host::Nested(assets) => format!(
                "nested arm64 KVM under {} with Linux {}",
                assets.qemu_version, assets.kernel_version
            ),
        }
    }
}

/// Files the nested machine boots from.
#[derive(Debug, Clone)]
pub struct NestedAssets {
    /// `qemu-system-aarch64` to run.
    pub qemu: PathBuf,
    /// "QEMU 10.0.2".
    pub qemu_version: String,
    /// Uncompressed or gzip arm64 Linux `Image`.
    pub kernel: PathBuf,
    /// Kernel release, e.g. `6.12.95+deb12-cloud-arm64`.
    pub kernel_version: String,
    /// Static arm64 busybox for the initramfs.
    pub busybox: PathBuf,
}

/// Makes sure KVM code can run: native on arm64 + `/dev/kvm`, else the nested machine.
pub fn prepare_machine() -> Result<Host> {
    if native_kvm_available() {
        return Ok(Host::Native);
    }
    let (qemu, qemu_version) = ensure_qemu()?;
    let (kernel, kernel_version, busybox) = ensure_guest_assets()?;
    if let Err(err) = crate::hibernate_kernel::ensure() {
        eprintln!(
            "setup: WARNING: no newer guest kernel for the hibernation test ({err:#}); it \
             is reported skipped (Linux {kernel_version} ends a hibernation with SYSTEM_OFF, \
             and its resume did not come back on vpsci)"
        );
    }
    Ok(Host::Nested(NestedAssets {
        qemu,
        qemu_version,
        kernel,
        kernel_version,
        busybox,
    }))
}

/// Everything: the machine, the rustup targets and cargo-fuzz.
pub fn prepare() -> Result<Host> {
    ensure_rust_targets()?;
    crate::fuzz::ensure_cargo_fuzz()?;
    prepare_machine()
}

/// True on an arm64 Linux host where we may open `/dev/kvm` read-write.
pub fn native_kvm_available() -> bool {
    cfg!(all(target_arch = "aarch64", target_os = "linux"))
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// Installs the rustup targets (and the fmt/clippy components) if any is missing.
pub fn ensure_rust_targets() -> Result<()> {
    let installed = run_captured(
        Command::new("rustup").args(["target", "list", "--installed"]),
        Duration::from_secs(60),
    );
    let installed = match installed {
        Ok(done) if done.success() => done.output,
        _ => {
            // No rustup: accept a toolchain that already ships the targets.
            for target in RUST_TARGETS {
                if !sysroot_has_target(target) {
                    bail!(
                        "the Rust target {target} is missing and rustup is not available to \
                         install it; install rustup (https://rustup.rs) or a toolchain with \
                         {target}, then rerun"
                    );
                }
            }
            return Ok(());
        }
    };
    let missing: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing rustup targets {}", missing.join(" "));
        run_checked(
            Command::new("rustup")
                .arg("target")
                .arg("add")
                .args(&missing),
            Duration::from_secs(900),
            &format!(
                "rustup could not install the target(s) {} (a refused download?). Check the \
                 network/proxy or run `rustup target add {}` by hand; KVM tests cannot run \
                 without them",
                missing.join(" "),
                missing.join(" ")
            ),
        )?;
    }
    let components = run_captured(
        Command::new("rustup").args(["component", "list", "--installed"]),
        Duration::from_secs(60),
    )?;
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !components.output.lines().any(|l| l.starts_with(c)))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing rustup components {}", missing.join(" "));
        run_checked(
            Command::new("rustup")
                .arg("component")
                .arg("add")
                .args(&missing),
            Duration::from_secs(900),
            &format!(
                "rustup could not install {}; run `rustup component add {}` by hand",
                missing.join(" "),
                missing.join(" ")
            ),
        )?;
    }
    Ok(())
}

fn sysroot_has_target(target: &str) -> bool {
    let Ok(done) = run_captured(
        Command::new("rustc").args(["--print", "sysroot"]),
        Duration::from_secs(30),
    ) else {
        return false;
    };
    Path::new(done.output.trim())
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// Finds `qemu-system-aarch64` >= 10, installing it from Debian when missing or old.
fn ensure_qemu() -> Result<(PathBuf, String)> {
    let found = qemu_version();
    if let Some((major, text)) = &found {
        if *major >= QEMU_MIN_MAJOR {
            return Ok((PathBuf::from("qemu-system-aarch64"), text.clone()));
        }
    }
    eprintln!("setup: installing qemu-system-arm (QEMU {QEMU_MIN_MAJOR}.x) from Debian");
    match install_qemu() {
        Ok(()) => {}
        Err(err) => match &found {
            Some((_, text)) => {
                eprintln!(
                    "setup: warning: could not install QEMU {QEMU_MIN_MAJOR}.x ({err:#}); \
                     continuing with the slower {text}"
                );
                return Ok((PathBuf::from("qemu-system-aarch64"), text.clone()));
            }
            None => return Err(err),
        },
    }
    match qemu_version() {
        Some((_, text)) => Ok((PathBuf::from("qemu-system-aarch64"), text)),
        None => bail!(
            "qemu-system-aarch64 is still not runnable after installing qemu-system-arm; \
             check `qemu-system-aarch64 --version`"
        ),
    }
}

/// `(major, "QEMU 10.0.2")` of the installed `qemu-system-aarch64`.
fn qemu_version() -> Option<(u32, String)> {
    let done = run_captured(
        Command::new("qemu-system-aarch64").arg("--version"),
        Duration::from_secs(30),
    )
    .ok()?;
    if !done.success() {
        return None;
    }
    parse_qemu_version(&done.output)
}

/// `(10, "QEMU 10.0.2")` from `QEMU emulator version 10.0.2 (Debian ...)`.
fn parse_qemu_version(output: &str) -> Option<(u32, String)> {
    let first = output.lines().next()?;
    let version = first.split("version ").nth(1)?.split_whitespace().next()?;
    let major = version.split('.').next()?.parse().ok()?;
    Some((major, format!("QEMU {version}")))
}

fn install_qemu() -> Result<()> {
    let suite = debian_setup()?;
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"]);
    if let Some(suite) = &suite {
        cmd.args(["-t", suite]);
    }
    cmd.arg("qemu-system-arm");
    // The machine image may delete downloaded .debs between dpkg runs ("cannot access
    // archive"); a retry downloads them again.
    retry(3, || {
        run_checked(
            &mut cmd,
            Duration::from_secs(1200),
            "apt-get could not install qemu-system-arm",
        )
        .map(drop)
    })
}

/// Checks we are root on Debian, adds the backports suite (bookworm) and the arm64 foreign
/// architecture if missing, and refreshes the package lists. Returns the suite to install
/// QEMU from (`None`: the default suites already have 10.x).
fn debian_setup() -> Result<Option<String>> {
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string());
    let Some(codename) = codename.filter(|_| Path::new("/usr/bin/apt-get").exists()) else {
        bail!(
            "this is not a Debian system with apt-get, so the nested harness cannot install \
             its tools; install qemu-system-aarch64 >= {QEMU_MIN_MAJOR} and place an arm64 \
             Linux Image and a static arm64 busybox in {} (files Image, busybox, kernel-version)",
            assets_dir().display()
        );
    };
    if !is_root() {
        bail!(
            "installing the nested harness's tools needs root (apt-get, dpkg); rerun as root \
             or run `cargo xtask setup` once as root"
        );
    }
    let mut changed = false;
    let suite = if codename == "bookworm" {
        let suite = "bookworm-backports".to_string();
        if !apt_sources_mention(&suite) {
            let mirror = debian_mirror();
            let path = "/etc/apt/sources.list.d/vpsci-bookworm-backports.sources";
            eprintln!("setup: adding {suite} from {mirror} in {path}");
            fs::write(
                path,
                format!(
                    "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                     Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
                ),
            )
            .with_context(|| format!("could not write {path}"))?;
            changed = true;
        }
        Some(suite)
    } else {
        None
    };
    let foreign = run_checked(
        Command::new("dpkg").arg("--print-foreign-architectures"),
        Duration::from_secs(30),
        "dpkg is not usable",
    )?;
    if !foreign.output.lines().any(|l| l.trim() == "arm64") {
        eprintln!("setup: dpkg --add-architecture arm64");
        run_checked(
            Command::new("dpkg").args(["--add-architecture", "arm64"]),
            Duration::from_secs(60),
            "could not add the arm64 architecture to dpkg",
        )?;
        changed = true;
    }
    if changed || !APT_UPDATED.with(|u| u.get()) {
        apt_update()?;
    }
    Ok(suite)
}

thread_local! {
    static APT_UPDATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn apt_update() -> Result<()> {
    eprintln!("setup: apt-get update");
    retry(2, || {
        run_checked(
            Command::new("apt-get").arg("update"),
            Duration::from_secs(600),
            "apt-get update failed; check the Debian mirror is reachable",
        )
        .map(drop)
    })?;
    APT_UPDATED.with(|u| u.set(true));
    Ok(())
}

fn apt_sources_mention(suite: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    files.iter().any(|f| {
        fs::read_to_string(f)
            .map(|text| {
                text.lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains(suite))
            })
            .unwrap_or(false)
    })
}

/// The Debian mirror the machine already uses (so backports come from the same place).
pub(crate) fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri {
                if uri.ends_with("/debian") || uri.ends_with("/debian/") {
                    return uri.trim_end_matches('/').to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

fn is_root() -> bool {
    run_captured(Command::new("id").arg("-u"), Duration::from_secs(10))
        .map(|d| d.output.trim() == "0")
        .unwrap_or(false)
}

pub(crate) fn retry(attempts: u32, mut step: impl FnMut() -> Result<()>) -> Result<()> {
    let mut last = None;
    for attempt in 1..=attempts {
        match step() {
            Ok(()) => return Ok(()),
            Err(err) => {
                if attempt < attempts {
                    eprintln!("setup: attempt {attempt}/{attempts} failed, retrying: {err:#}");
                }
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}

/// `<target>/nested/assets`.
pub fn assets_dir() -> PathBuf {
    paths::nested_dir().join("assets")
}

/// Kernel modules kept from the kernel package (path under `lib/modules/<release>/`), for
/// the tests whose Linux guest loads them: the kernel has `VIRTIO_MMIO=m` and `VIRTIO_BLK=m`
/// (both depend only on built-in code). Stored uncompressed in `assets/modules/`, so busybox's
/// `insmod` can load them.
pub const GUEST_MODULES: [&str; 2] = [
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// `<assets>/modules`.
pub fn modules_dir() -> PathBuf {
    assets_dir().join("modules")
}

/// The files [`GUEST_MODULES`] are kept as in `dir`.
pub fn module_files(dir: &Path) -> Vec<PathBuf> {
    GUEST_MODULES
        .iter()
        .filter_map(|m| Path::new(m).file_name().map(|n| dir.join(n)))
        .collect()
}

/// The cached [`GUEST_MODULES`], if every one of them is there.
pub fn cached_guest_modules() -> Option<Vec<PathBuf>> {
    let files = module_files(&modules_dir());
    (files.len() == GUEST_MODULES.len() && files.iter().all(|f| f.is_file())).then_some(files)
}

/// The cached kernel, its modules and busybox, downloading and unpacking them on first use
/// (a cache from before the modules were kept is provisioned again).
fn ensure_guest_assets() -> Result<(PathBuf, String, PathBuf)> {
    let dir = assets_dir();
    let kernel = dir.join("Image");
    let busybox = dir.join("busybox");
    let version_file = dir.join("kernel-version");
    if let (true, true, true, Ok(version)) = (
        kernel.is_file(),
        busybox.is_file(),
        cached_guest_modules().is_some(),
        fs::read_to_string(&version_file),
    ) {
        return Ok((kernel, version.trim().to_string(), busybox));
    }
    fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    debian_setup()?;
    let package = newest_cloud_kernel()?;
    // Per-process work directory and renames into place (the version file last), so
    // concurrent first runs cannot see or leave a half-written cache.
    let work = dir.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    eprintln!("setup: downloading {package}:arm64 and busybox-static:arm64");
    let debs = download_debs(
        &work,
        &[&format!("{package}:arm64"), "busybox-static:arm64"],
    )?;
    let unpacked = work.join("root");
    for deb in &debs {
        run_checked(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpacked),
            Duration::from_secs(300),
            &format!("could not unpack {}", deb.display()),
        )?;
    }
    let boot = unpacked.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{package} has no /boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} contains no /boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let modules = work.join("modules");
    fs::create_dir_all(&modules)?;
    for module in GUEST_MODULES {
        let packed = unpacked
            .join("lib/modules")
            .join(&release)
            .join(format!("{module}.xz"));
        let name = Path::new(module)
            .file_name()
            .with_context(|| format!("module path {module} has no file name"))?;
        // `xz -d` leaves the module next to the packed file, without `.xz`.
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
    let _ = fs::remove_dir_all(modules_dir());
    fs::rename(&modules, modules_dir())?;
    fs::rename(&vmlinuz, &kernel)?;
    fs::rename(unpacked.join("bin/busybox"), &busybox)
        .context("busybox-static did not contain /bin/busybox")?;
    let version_tmp = work.join("kernel-version");
    fs::write(&version_tmp, format!("{release}\n"))?;
    fs::rename(&version_tmp, &version_file)?;
    fs::remove_dir_all(&work)?;
    Ok((kernel, release, busybox))
}

/// Offset of the arm64 `Image` header's magic (`ARM\x64`).
const ARM64_IMAGE_MAGIC_AT: usize = 0x38;

/// An uncompressed arm64 Linux `Image` from the cached assets, for the tests that boot a
/// real Linux guest (`VPSCI_TEST_KERNEL`, `VPSCI_LINUX_IMAGE`); `None` when the assets were
/// never provisioned (arm64 hosts with `/dev/kvm` do not download them) or hold no usable
/// kernel. Debian's arm64 `vmlinuz` already is an `Image`; a gzip one is decompressed once
/// into `Image.uncompressed` next to it.
pub fn cached_linux_image() -> Option<PathBuf> {
    let dir = assets_dir();
    let kernel = dir.join("Image");
    let head = read_head(&kernel, ARM64_IMAGE_MAGIC_AT + 4)?;
    if is_arm64_image(&head) {
        return Some(kernel);
    }
    if !head.starts_with(&[0x1f, 0x8b]) {
        return None;
    }
    let unpacked = dir.join("Image.uncompressed");
    if read_head(&unpacked, ARM64_IMAGE_MAGIC_AT + 4).is_some_and(|h| is_arm64_image(&h)) {
        return Some(unpacked);
    }
    let tmp = dir.join(format!("Image.uncompressed.{}", std::process::id()));
    let out = fs::File::create(&tmp).ok()?;
    let status = Command::new("gzip")
        .arg("-dc")
        .arg(&kernel)
        .stdout(out)
        .status();
    let valid = status.is_ok_and(|s| s.success())
        && read_head(&tmp, ARM64_IMAGE_MAGIC_AT + 4).is_some_and(|h| is_arm64_image(&h));
    if valid && fs::rename(&tmp, &unpacked).is_ok() {
        return Some(unpacked);
    }
    let _ = fs::remove_file(&tmp);
    None
}

/// The first `len` bytes of `path`, if it is that long.
fn read_head(path: &Path, len: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = vec![0; len];
    fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    Some(head)
}

/// True if `head` starts with an arm64 Linux `Image` header.
fn is_arm64_image(head: &[u8]) -> bool {
    head.get(ARM64_IMAGE_MAGIC_AT..ARM64_IMAGE_MAGIC_AT + 4) == Some(b"ARM\x64".as_slice())
}

/// True if `qemu-system-aarch64` runs (any version).
pub fn qemu_available() -> bool {
    qemu_version().is_some()
}

/// The newest `linux-image-6.12.*-cloud-arm64-unsigned` apt knows.
fn newest_cloud_kernel() -> Result<String> {
    let done = run_checked(
        Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.12\.[0-9.]*\+deb[0-9]*-cloud-arm64-unsigned$",
        ]),
        Duration::from_secs(60),
        "apt-cache could not search the package lists",
    )?;
    match newest_kernel_in(&done.output) {
        Some(name) => Ok(name),
        None => bail!(
            "apt offers no linux-image-6.12.*-cloud-arm64-unsigned package; the nested \
             machine needs it (bookworm-backports with the arm64 architecture added). Check \
             `apt-cache search cloud-arm64-unsigned` after `apt-get update`"
        ),
    }
}

/// The package with the highest kernel version among `apt-cache search` result lines.
pub(crate) fn newest_kernel_in(search_output: &str) -> Option<String> {
    let mut names: Vec<(Vec<u32>, String)> = search_output
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .map(str::trim)
        .filter_map(|name| {
            let version = name.strip_prefix("linux-image-")?.split('+').next()?;
            let key = version
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, name.to_string()))
        })
        .collect();
    names.sort();
    names.pop().map(|(_, name)| name)
}

/// `apt-get download` into `dir` (retrying), returning the .deb paths.
fn download_debs(dir: &Path, packages: &[&str]) -> Result<Vec<PathBuf>> {
    retry(3, || {
        run_checked(
            Command::new("apt-get")
                .arg("download")
                .args(packages)
                .current_dir(dir),
            Duration::from_secs(900),
            "apt-get download failed; check the Debian mirror is reachable",
        )
        .map(drop)
    })?;
    let debs: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    if debs.len() != packages.len() {
        bail!(
            "apt-get download of {} left {} .deb files in {}, expected {}",
            packages.join(" "),
            debs.len(),
            dir.display(),
            packages.len()
        );
    }
    Ok(debs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_kernel_wins_by_numeric_version() {
        let search = "\
linux-image-6.12.95+deb12-cloud-arm64-unsigned - Linux 6.12 for arm64 cloud
linux-image-6.12.117+deb12-cloud-arm64-unsigned - Linux 6.12 for arm64 cloud
linux-image-6.12.43+deb12-cloud-arm64-unsigned - Linux 6.12 for arm64 cloud
";
        assert_eq!(
            newest_kernel_in(search).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-arm64-unsigned")
        );
        assert_eq!(newest_kernel_in(""), None);
    }

    #[test]
    fn only_an_arm64_image_header_is_taken_for_a_kernel() {
        let mut head = vec![0u8; ARM64_IMAGE_MAGIC_AT + 4];
        head[..2].copy_from_slice(b"MZ");
        head[ARM64_IMAGE_MAGIC_AT..].copy_from_slice(b"ARM\x64");
        assert!(is_arm64_image(&head));
        head[ARM64_IMAGE_MAGIC_AT + 3] = 0;
        assert!(!is_arm64_image(&head));
        assert!(!is_arm64_image(&[0x1f, 0x8b, 8, 0]));
    }

    #[test]
    fn qemu_version_is_read_from_its_banner() {
        let banner = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n";
        assert_eq!(
            parse_qemu_version(banner),
            Some((10, "QEMU 10.0.2".to_string()))
        );
        assert_eq!(parse_qemu_version("not qemu"), None);
    }
}
