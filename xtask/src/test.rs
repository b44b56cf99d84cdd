//! `cargo xtask test`: the whole gate, as CI runs it.
//!
//! Installs what is missing ([`provision`]), then runs, one line per group: `cargo fmt
//! --check` and clippy for the bare-metal guests workspace; `cargo fmt --check`, clippy and
//! rustdoc with `-D warnings` for the host and for
//! `aarch64-unknown-linux-musl` (the KVM code only compiles there); the native tests of the
//! whole workspace; the firmware's loom model checks (`--cfg loom`, own target dir); and, in ONE boot of the arm64 KVM machine, the harness self-test, every
//! test binary (built for `aarch64-unknown-linux-musl`) of each workspace package that can
//! reach KVM (depends on `kvm-ioctls`), and the suites other modules add through
//! [`hooked_nested_groups`]. Ends with `N passed, M failed[, K skipped]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cargo::{self, cargo, BUILD_TIMEOUT};
use crate::fuzz;
use crate::hibernate_kernel;
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Session};
use crate::nested::forwarded_env;
use crate::process::run_captured;
use crate::provision::{self, Host, KVM_TEST_TARGET};
use crate::report::{failure_sections, parse_libtest, Counts, GroupOutcome, Report};
use crate::runner::{timeout_from_env, with_sibling_executables};

/// What a [`Judge`] made of a job: its scenario counts and lines to show.
#[derive(Debug, Clone, Default)]
pub struct Judged {
    /// Passed, failed (by name) and skipped (with reasons) scenarios.
    pub counts: Counts,
    /// Scenarios the job's run plans; fewer verdicts fail the group.
    pub expected: u64,
    /// Measurement lines, shown under the group's line (e.g. CPU_ON race counts).
    pub info: Vec<String>,
    /// Why scenarios failed, with the end of the run's output (shown on failure).
    pub detail: String,
}

/// Judges a finished job on the host from its output lines and result.
pub type Judge = Arc<dyn Fn(&[String], &JobResult) -> Judged + Send + Sync>;

/// How a nested group's output is counted.
#[derive(Clone)]
pub enum CountStyle {
    /// A libtest binary: count its tests.
    Libtest,
    /// One check: exit status 0 passes.
    Check,
    /// Conformance scenarios, judged on the host.
    Scenarios(Judge),
}

impl std::fmt::Debug for CountStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CountStyle::Libtest => "Libtest",
            CountStyle::Check => "Check",
            CountStyle::Scenarios(_) => "Scenarios",
        })
    }
}

/// One job in the shared nested boot, reported as one group.
#[derive(Debug, Clone)]
pub struct NestedGroup {
    /// Group name on its report line.
    pub name: String,
    /// Files the job needs in the machine.
    pub files: Vec<GuestFile>,
    /// Directories to put on PATH.
    pub path: Vec<String>,
    /// The job.
    pub job: Job,
    /// How to count it.
    pub style: CountStyle,
    /// Print its output under its line even when it passes.
    pub show_output: bool,
}

/// Suites from other modules that run in the same boot as the test binaries.
///
/// Hook: a module that adds KVM-level tests (e.g. `conformance`, the guest conformance
/// suite) returns its groups here: `groups.extend(crate::conformance::nested_groups(long)?);`.
fn hooked_nested_groups(long: bool) -> Result<Vec<NestedGroup>> {
    let mut groups = Vec::new();
    groups.extend(crate::conformance::nested_groups(long)?);
    groups.extend(crate::bench::nested_groups()?);
    Ok(groups)
}

/// Entry point of `cargo xtask test [--long]`; `--long` runs the conformance suite's
/// long sizes (1000 CPU_ON race rounds, 200 system-suspend rounds, 600 s power storms and
/// hostile runs, 200 resets racing a storm, 1000 reset cycles; docs/conformance.md) and the
/// Linux tests' long modes ([`LONG_ENV`]).
pub fn run(args: &[String]) -> Result<ExitCode> {
    let long = match args {
        [] => false,
        [flag] if flag == "--long" => true,
        [arg, ..] => bail!("usage: cargo xtask test [--long] (got `{arg}`)"),
    };
    let started = Instant::now();
    let mut report = Report::default();

    let setup_started = Instant::now();
    let host = match provision::prepare() {
        Ok(host) => {
            println!(
                "setup ... ready: {} [{:.1} s]",
                host.describe(),
                setup_started.elapsed().as_secs_f64()
            );
            Some(host)
        }
        Err(err) => {
            report.group(
                "setup",
                GroupOutcome::Check { passed: false },
                setup_started.elapsed(),
                &format!("{err:#}"),
            );
            None
        }
    };

    for (name, mut cmd) in checks() {
        check(&mut report, name, &mut cmd);
    }
    let linux_image = provision::cached_linux_image();
    let qemu_dtb_runs_natively = linux_image.is_some() && provision::qemu_available();
    native_tests(
        &mut report,
        linux_image.as_deref().filter(|_| qemu_dtb_runs_natively),
    );
    loom_tests(&mut report);
    fuzz_runs(&mut report);
    miri_tests(&mut report);
    match &host {
        Some(host) => nested_tests(
            &mut report,
            host,
            linux_image.as_deref(),
            qemu_dtb_runs_natively,
            long,
        ),
        None => report.group(
            "KVM tests (nested)",
            GroupOutcome::Check { passed: false },
            Duration::ZERO,
            "not run: setup failed (see above)",
        ),
    }
    report.finish(started.elapsed());
    Ok(if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn checks() -> Vec<(&'static str, Command)> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let clippy = |target: Option<&str>| {
        let mut cmd = cargo();
        cmd.args(["clippy", "--workspace", "--all-targets"]);
        if let Some(target) = target {
            cmd.args(["--target", target]);
        }
        cmd.args(["--", "-D", "warnings"]);
        cmd
    };
    let doc = |target: Option<&str>| {
        let mut cmd = cargo();
        cmd.args(["doc", "--workspace", "--no-deps"]);
        if let Some(target) = target {
            cmd.args(["--target", target]);
        }
        cmd.env("RUSTDOCFLAGS", "-D warnings");
        cmd
    };
    // The bare-metal guests are their own workspace (aarch64-unknown-none, set in
    // guests/.cargo/config.toml), so the workspace-wide commands above miss them.
    let guests = |args: &[&str]| {
        let mut cmd = cargo();
        cmd.current_dir(crate::paths::workspace_root().join("guests"))
            .args(args)
            .env_remove("RUSTFLAGS");
        cmd
    };
    vec![
        ("fmt --check", fmt),
        (
            "fmt --check (guests)",
            guests(&["fmt", "--all", "--", "--check"]),
        ),
        (
            "clippy -D warnings (guests, aarch64-unknown-none)",
            guests(&["clippy", "--release", "--", "-D", "warnings"]),
        ),
        ("clippy -D warnings (host)", clippy(None)),
        (
            "clippy -D warnings (aarch64-unknown-linux-musl)",
            clippy(Some(KVM_TEST_TARGET)),
        ),
        ("doc -D warnings (host)", doc(None)),
        (
            "doc -D warnings (aarch64-unknown-linux-musl)",
            doc(Some(KVM_TEST_TARGET)),
        ),
    ]
}

fn check(report: &mut Report, name: &str, cmd: &mut Command) {
    let started = Instant::now();
    let (passed, detail) = match run_captured(cmd, BUILD_TIMEOUT) {
        Ok(done) if done.success() => (true, String::new()),
        Ok(done) if done.timed_out => (
            false,
            format!(
                "killed after {} s\n{}",
                BUILD_TIMEOUT.as_secs(),
                done.tail(60)
            ),
        ),
        Ok(done) => (false, done.tail(60)),
        Err(err) => (false, format!("{err:#}")),
    };
    report.group(
        name,
        GroupOutcome::Check { passed },
        started.elapsed(),
        &detail,
    );
}

/// The native test that boots Linux under QEMU TCG with our device tree
/// (`crates/vmm/tests/qemu_dtb.rs`); `#[ignore]`d unless it is given a kernel.
const QEMU_DTB_TEST: (&str, &str) = (
    "qemu_dtb",
    "linux_boots_all_cpus_with_our_device_tree_under_qemu",
);

/// The KVM test binaries that boot Linux on vpsci are the ones whose name starts with
/// this (`crates/vmm/tests/nested_linux.rs`, `nested_linux_suspend.rs`, ...); their tests
/// are `#[ignore]`d unless they are given a kernel.
const NESTED_LINUX_TEST: &str = "nested_linux";

/// The Linux test that hibernates and resumes; it runs only with the newer kernel.
const NESTED_LINUX_HIBERNATE_TEST: &str = "nested_linux_hibernate";
/// The control API's KVM test; it gets the `power_storm` guest (`VPSCI_STORM_GUEST`) to
/// measure the API's latency during a CPU_ON/CPU_OFF storm.
const NESTED_API_TEST: &str = "nested_api";
/// The guest program the API's storm measurement runs.
const STORM_GUEST: &str = "power-storm";

/// Linux test binaries that can outlast the usual job limit on a loaded host, with the
/// limit each gets unless `VPSCI_NESTED_TIMEOUT` allows more: the hotplug storm (1400
/// hotplug steps at 8 vCPUs, 2-9 minutes) and the hibernation binary (three Linux runs
/// with the 6.17 kernel: hibernate, resume, refused hibernate; 4-7 minutes).
const SLOW_LINUX_TESTS: &[(&str, Duration)] = &[
    ("nested_linux_hotplug", Duration::from_secs(1500)),
    (NESTED_LINUX_HIBERNATE_TEST, Duration::from_secs(1200)),
];

/// Set (to `1`) for the [`NESTED_LINUX_TEST`] binaries by `cargo xtask test --long`: they
/// run their long modes (`nested_linux_hotplug`: the storm at 64 vCPUs instead of 8).
/// Also honoured when set by hand for `cargo test`, whose runner passes `VPSCI_*` in.
pub const LONG_ENV: &str = "VPSCI_LONG";

/// A [`NESTED_LINUX_TEST`] binary's time limit in `--long` runs, unless
/// `VPSCI_NESTED_TIMEOUT` allows more.
const LONG_LINUX_TIMEOUT: Duration = Duration::from_secs(3600);

/// `cargo test --workspace`; given a kernel (cached, and QEMU is installed) also the
/// ignored [`QEMU_DTB_TEST`] (filtered out of the first run, then run on its own with
/// `VPSCI_TEST_KERNEL`), so it is counted once: passed, or skipped with its reason.
fn native_tests(report: &mut Report, kernel: Option<&Path>) {
    let started = Instant::now();
    let (package, test) = QEMU_DTB_TEST;
    let mut workspace = cargo();
    workspace.args(["test", "--workspace", "--no-fail-fast"]);
    let mut commands = vec![workspace];
    if let Some(kernel) = kernel {
        commands[0].args(["--", "--skip", test]);
        let mut linux = cargo();
        linux
            .args(["test", "-p", "vpsci", "--test", package, "--", "--ignored"])
            .args(["--exact", test])
            .env("VPSCI_TEST_KERNEL", kernel);
        commands.push(linux);
    }
    // Counts come from stdout alone: libtest prints its results there, and the merged
    // stream can split a `test result:` line with a chunk of cargo's stderr.
    let mut output = String::new();
    let mut stdout = String::new();
    let mut success = true;
    let mut tails = Vec::new();
    for cmd in &mut commands {
        match run_captured(cmd, BUILD_TIMEOUT) {
            Ok(done) => {
                success &= done.success();
                tails.push(done.tail(80));
                output.push_str(&done.output);
                output.push('\n');
                stdout.push_str(&done.stdout);
                stdout.push('\n');
            }
            Err(err) => {
                report.group(
                    "native tests (host)",
                    GroupOutcome::Check { passed: false },
                    started.elapsed(),
                    &format!("{err:#}"),
                );
                return;
            }
        }
    }
    let failures = failure_sections(&output);
    let detail = if failures.is_empty() {
        tails.join("\n")
    } else {
        failures
    };
    let outcome = GroupOutcome::Tests {
        counts: parse_libtest(&stdout),
        success,
    };
    report.group("native tests (host)", outcome, started.elapsed(), &detail);
}

/// The firmware's loom model checks (`crates/firmware/tests/loom_*.rs`), built with
/// `--cfg loom` in their own target directory (`<target>/loom`) so the flag does not
/// invalidate the normal build. See docs/firmware-verification.md.
fn loom_tests(report: &mut Report) {
    let started = Instant::now();
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "vpsci-firmware",
        "--release",
        "--test",
        "loom_coordinator",
    ]);
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(" --cfg loom");
    cmd.env("RUSTFLAGS", rustflags.trim_start());
    cmd.env("CARGO_TARGET_DIR", crate::paths::target_dir().join("loom"));
    let (outcome, detail) = match run_captured(&mut cmd, BUILD_TIMEOUT) {
        Ok(done) => {
            let failures = failure_sections(&done.output);
            let detail = if failures.is_empty() {
                done.tail(80)
            } else {
                failures
            };
            (
                GroupOutcome::Tests {
                    counts: parse_libtest(&done.stdout),
                    success: done.success(),
                },
                detail,
            )
        }
        Err(err) => (GroupOutcome::Check { passed: false }, format!("{err:#}")),
    };
    report.group(
        "loom model checks (firmware)",
        outcome,
        started.elapsed(),
        &detail,
    );
}

/// The firmware engine's unit tests under Miri (undefined behaviour, out-of-bounds and
/// aliasing checks). Miri needs a nightly toolchain with the `miri` component: installed
/// with rustup when missing; the group fails (never skips) when it cannot be. Built in
/// `<target>/miri`. See docs/firmware-verification.md.
fn miri_tests(report: &mut Report) {
    let started = Instant::now();
    let name = "miri (firmware unit tests)";
    // The outer (stable) cargo's toolchain must not leak into the nightly one.
    let nightly = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.current_dir(crate::paths::workspace_root())
            .arg("+nightly")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("CARGO")
            .env_remove("RUSTFLAGS");
        cmd
    };
    let probe = run_captured(
        nightly("cargo").args(["miri", "--version"]),
        Duration::from_secs(60),
    );
    if !matches!(&probe, Ok(done) if done.success()) {
        eprintln!("setup: installing the nightly miri and rust-src components (rustup)");
        let installed = run_captured(
            nightly("rustup").args(["component", "add", "miri", "rust-src"]),
            Duration::from_secs(900),
        );
        if !matches!(&installed, Ok(done) if done.success()) {
            let why = match installed {
                Ok(done) => done.tail(20),
                Err(err) => format!("{err:#}"),
            };
            report.group(
                name,
                GroupOutcome::Check { passed: false },
                started.elapsed(),
                &format!(
                    "Miri needs a nightly toolchain with the miri component; \
                     `rustup +nightly component add miri rust-src` failed:\n{why}"
                ),
            );
            return;
        }
    }
    let mut cmd = nightly("cargo");
    cmd.args(["miri", "test", "-p", "vpsci-firmware", "--lib"])
        .env("CARGO_TARGET_DIR", crate::paths::target_dir().join("miri"));
    let (outcome, detail) = match run_captured(&mut cmd, BUILD_TIMEOUT) {
        Ok(done) => (
            GroupOutcome::Tests {
                counts: parse_libtest(&done.stdout),
                success: done.success(),
            },
            done.tail(80),
        ),
        Err(err) => (GroupOutcome::Check { passed: false }, format!("{err:#}")),
    };
    report.group(name, outcome, started.elapsed(), &detail);
}

/// Each cargo-fuzz target for [`fuzz::CI_SECONDS`] from its repository corpus (one group
/// each, with libFuzzer's execution count under it). See docs/reliability.md.
fn fuzz_runs(report: &mut Report) {
    let started = Instant::now();
    let prepared = fuzz::targets().and_then(|targets| fuzz::build().map(|()| targets));
    let targets = match prepared {
        Ok(targets) => targets,
        Err(err) => {
            report.group(
                "fuzz (build)",
                GroupOutcome::Check { passed: false },
                started.elapsed(),
                &format!("{err:#}"),
            );
            return;
        }
    };
    for target in targets {
        let started = Instant::now();
        let name = format!("fuzz {target} ({} s)", fuzz::CI_SECONDS);
        match fuzz::run_target(&target, fuzz::CI_SECONDS) {
            Ok(run) => {
                report.group(
                    &name,
                    GroupOutcome::Check { passed: run.passed },
                    started.elapsed(),
                    &run.detail,
                );
                println!("    {}", run.summary());
            }
            Err(err) => report.group(
                &name,
                GroupOutcome::Check { passed: false },
                started.elapsed(),
                &format!("{err:#}"),
            ),
        }
    }
}

fn nested_tests(
    report: &mut Report,
    host: &Host,
    linux_image: Option<&Path>,
    qemu_dtb_runs_natively: bool,
    long: bool,
) {
    let started = Instant::now();
    let groups = match nested_groups(linux_image, qemu_dtb_runs_natively, long) {
        Ok(groups) => groups,
        Err(err) => {
            report.group(
                "KVM tests: build for aarch64-unknown-linux-musl",
                GroupOutcome::Check { passed: false },
                started.elapsed(),
                &format!("{err:#}"),
            );
            return;
        }
    };
    println!(
        "KVM tests: {} groups built in {:.1} s, running in one boot on {}",
        groups.len(),
        started.elapsed().as_secs_f64(),
        host.describe()
    );
    let mut files: BTreeMap<String, GuestFile> = BTreeMap::new();
    let mut path = Vec::new();
    for group in &groups {
        for file in &group.files {
            files.insert(file.guest.clone(), file.clone());
        }
        for dir in &group.path {
            if !path.contains(dir) {
                path.push(dir.clone());
            }
        }
    }
    let session = Session {
        files: files.into_values().collect(),
        path,
        jobs: groups.iter().map(|g| g.job.clone()).collect(),
    };
    let config = session_machine(&session);
    let mut observer = GroupObserver {
        report,
        groups: &groups,
        output: vec![Vec::new(); groups.len()],
        reported: vec![false; groups.len()],
        verbose: std::env::var_os("VPSCI_TEST_VERBOSE").is_some(),
    };
    let boot_started = Instant::now();
    let result = machine::run(host, &config, &session, &mut observer);
    println!(
        "KVM tests: machine session (boot, {} jobs, power-off) took {:.1} s",
        groups.len(),
        boot_started.elapsed().as_secs_f64()
    );
    let why = match result {
        Ok(_) => "its result never arrived from the machine".to_string(),
        Err(err) => format!("not run: {err:#}"),
    };
    observer.fail_unreported(&why);
}

/// The self-test, every aarch64 test binary of the packages that can reach KVM, and the
/// hooked suites. With a cached kernel the [`NESTED_LINUX_TEST`] binaries also get the
/// kernel and its cached modules copied in, `VPSCI_LINUX_IMAGE`, `VPSCI_LINUX_MODULES` (the
/// modules' directory) and `--include-ignored --nocapture` (its
/// output, the guest's PSCI and CPU lines, is shown under its line). When the native run
/// covered [`QEMU_DTB_TEST`], its arm64 build skips it (the machine has no QEMU) rather
/// than reporting it skipped a second time.
fn nested_groups(
    linux_image: Option<&Path>,
    qemu_dtb_runs_natively: bool,
    long: bool,
) -> Result<Vec<NestedGroup>> {
    let timeout = timeout_from_env()?;
    let env = forwarded_env();
    let mut groups = Vec::new();

    let (built, _) = cargo::build_executables(cargo().args([
        "build",
        "--package",
        "vpsci-harness-selftest",
        "--target",
        KVM_TEST_TARGET,
    ]))?;
    let selftest = built
        .into_iter()
        .find(|e| e.target == "vpsci-harness-selftest" && !e.test)
        .context("cargo built no vpsci-harness-selftest binary")?;
    let (files, bin_dir) = with_sibling_executables(&selftest.path)?;
    groups.push(NestedGroup {
        name: "harness self-test (real KVM, PSCI forwarded)".to_string(),
        files,
        path: vec![bin_dir],
        job: Job {
            argv: vec![selftest.path.to_string_lossy().into_owned()],
            cwd: selftest.manifest_dir.to_string_lossy().into_owned(),
            env: env.clone(),
            timeout,
        },
        style: CountStyle::Check,
        show_output: true,
    });

    let packages = cargo::packages_using_kvm(KVM_TEST_TARGET)?;
    let mut cmd = cargo();
    cmd.args(["test", "--target", KVM_TEST_TARGET, "--no-run"]);
    for package in &packages {
        cmd.args(["--package", package]);
    }
    let built = if packages.is_empty() {
        Vec::new()
    } else {
        cargo::build_executables(&mut cmd)?.0
    };
    for exe in built.into_iter().filter(|e| e.test) {
        let (mut files, bin_dir) = with_sibling_executables(&exe.path)?;
        let mut argv = vec![exe.path.to_string_lossy().into_owned()];
        let mut job_env = env.clone();
        job_env.push((
            "CARGO_MANIFEST_DIR".to_string(),
            exe.manifest_dir.to_string_lossy().into_owned(),
        ));
        let mut show_output = false;
        let mut job_timeout = timeout;
        let is_nested_linux = exe.kind == "test" && exe.target.starts_with(NESTED_LINUX_TEST);
        // The hibernation test boots the newer kernel (see hibernate_kernel), the
        // others the harness's; without the newer kernel it gets none and reports
        // itself skipped (6.12's resume did not come back in our runs).
        let is_hibernate = exe.target == NESTED_LINUX_HIBERNATE_TEST;
        let newer = is_hibernate.then(hibernate_kernel::cached).flatten();
        let kernel_for_it =
            linux_image.filter(|_| is_nested_linux && (!is_hibernate || newer.is_some()));
        if let Some(image) = kernel_for_it {
            let image = newer.as_ref().map_or(image, |(newer, _)| newer.as_path());
            let guest = image.to_string_lossy().into_owned();
            files.push(GuestFile {
                host: image.to_path_buf(),
                guest: guest.clone(),
            });
            job_env.push(("VPSCI_LINUX_IMAGE".to_string(), guest));
            // The kernel's virtio modules, for the guests that use a disk.
            let modules = match &newer {
                Some((_, dir)) => Some((dir.clone(), provision::module_files(dir))),
                None => provision::cached_guest_modules().map(|m| (provision::modules_dir(), m)),
            };
            if let Some((dir, modules)) = modules {
                for module in modules {
                    files.push(GuestFile {
                        guest: module.to_string_lossy().into_owned(),
                        host: module,
                    });
                }
                job_env.push((
                    "VPSCI_LINUX_MODULES".to_string(),
                    dir.to_string_lossy().into_owned(),
                ));
            }
            argv.extend(["--include-ignored".to_string(), "--nocapture".to_string()]);
            show_output = true;
            if let Some((_, limit)) = SLOW_LINUX_TESTS.iter().find(|(t, _)| *t == exe.target) {
                job_timeout = job_timeout.max(*limit);
            }
            if long {
                // The Linux tests' long modes (nested_linux_hotplug: 64 vCPUs).
                job_env.push((LONG_ENV.to_string(), "1".to_string()));
                job_timeout = job_timeout.max(LONG_LINUX_TIMEOUT);
            }
        }
        if exe.kind == "test" && exe.target == NESTED_API_TEST {
            // An ELF the VMM loads as it is (the test patches the storm's length into it).
            match crate::conformance::build_guests().and_then(|guests| {
                guests
                    .get(STORM_GUEST)
                    .cloned()
                    .with_context(|| format!("the guests build has no {STORM_GUEST}"))
            }) {
                Ok(elf) => {
                    let guest = elf.to_string_lossy().into_owned();
                    files.push(GuestFile {
                        host: elf,
                        guest: guest.clone(),
                    });
                    job_env.push(("VPSCI_STORM_GUEST".to_string(), guest));
                }
                Err(e) => eprintln!(
                    "warning: cannot build the {STORM_GUEST} guest ({e:#}); the API's storm \
                     latency test will report itself skipped"
                ),
            }
        }
        if qemu_dtb_runs_natively && exe.kind == "test" && exe.target == QEMU_DTB_TEST.0 {
            // Counted once, natively; here it would run no test at all.
            continue;
        }
        groups.push(NestedGroup {
            name: format!("KVM tests: {}", exe.label()),
            files,
            path: vec![bin_dir],
            job: Job {
                argv,
                cwd: exe.manifest_dir.to_string_lossy().into_owned(),
                env: job_env,
                timeout: job_timeout,
            },
            style: CountStyle::Libtest,
            show_output,
        });
    }
    groups.extend(hooked_nested_groups(long)?);
    Ok(groups)
}

/// The machine for the one-boot session: the default, with twice the session's files added
/// to its RAM. The files become the root file system (a tmpfs in RAM), whose size limit the
/// kernel sets while unpacking them, at half of the RAM the initramfs does not occupy: with
/// the payload added once, that limit stays at half the default (1 GiB), and a session of
/// more than that fails with "Initramfs unpacking failed: write error" (seen when the
/// session grew to 69 groups). Twice the payload keeps the limit above the payload and
/// leaves the default's RAM to the tests.
fn session_machine(session: &Session) -> MachineConfig {
    let payload: u64 = session
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(&f.host).ok())
        .map(|m| m.len())
        .sum();
    let payload_mib = payload.div_ceil(1 << 20).next_multiple_of(256);
    let mut config = MachineConfig::default();
    config.memory_mib += 2 * payload_mib;
    config
}

/// Collects each job's output and reports its group when it ends.
struct GroupObserver<'a> {
    report: &'a mut Report,
    groups: &'a [NestedGroup],
    output: Vec<Vec<String>>,
    reported: Vec<bool>,
    verbose: bool,
}

impl GroupObserver<'_> {
    /// Reports every group whose job never finished as failed, by name.
    fn fail_unreported(&mut self, why: &str) {
        for (group, reported) in self.groups.iter().zip(&mut self.reported) {
            if !*reported {
                *reported = true;
                self.report.group(
                    &group.name,
                    GroupOutcome::Check { passed: false },
                    Duration::ZERO,
                    why,
                );
            }
        }
    }
}

impl Observer for GroupObserver<'_> {
    fn line(&mut self, job: usize, line: &str) {
        if self.verbose {
            println!("  [{job}] {line}");
        }
        if let Some(buffer) = self.output.get_mut(job) {
            buffer.push(line.to_string());
        }
    }

    fn finished(&mut self, job: usize, result: &JobResult) {
        let Some(group) = self.groups.get(job) else {
            return;
        };
        match self.reported.get_mut(job) {
            Some(reported) if !*reported => *reported = true,
            // A second result for one job: the first stands.
            _ => return,
        }
        let lines = self.output.get(job).map(Vec::as_slice).unwrap_or_default();
        let output = lines.join("\n");
        let why = result.describe(group.job.timeout);
        let outcome = match &group.style {
            CountStyle::Check => GroupOutcome::Check {
                passed: result.passed(),
            },
            CountStyle::Libtest => GroupOutcome::Tests {
                counts: parse_libtest(&output),
                success: result.passed(),
            },
            CountStyle::Scenarios(judge) => {
                let judged = judge(lines, result);
                let ok = judged.counts.failed == 0;
                self.report.group(
                    &group.name,
                    GroupOutcome::Scenarios {
                        counts: judged.counts,
                        expected: judged.expected,
                    },
                    result.elapsed,
                    &judged.detail,
                );
                if ok {
                    for line in &judged.info {
                        println!("    | {line}");
                    }
                }
                return;
            }
        };
        if group.show_output && result.passed() {
            self.report.group(&group.name, outcome, result.elapsed, "");
            for line in lines {
                println!("    | {line}");
            }
        } else {
            let failures = failure_sections(&output);
            // A job whose output is shown may stream its test output (`--nocapture`), which
            // then is not in the failure sections: show its end instead.
            let detail = if failures.is_empty() || group.show_output {
                let start = lines.len().saturating_sub(60);
                format!("{why}\n{}", lines[start..].join("\n"))
            } else {
                format!("{why}\n{failures}")
            };
            self.report
                .group(&group.name, outcome, result.elapsed, &detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> NestedGroup {
        NestedGroup {
            name: name.to_string(),
            files: Vec::new(),
            path: Vec::new(),
            job: Job {
                argv: vec!["true".into()],
                cwd: "/".into(),
                env: Vec::new(),
                timeout: Duration::from_secs(1),
            },
            style: CountStyle::Check,
            show_output: false,
        }
    }

    #[test]
    fn a_job_whose_result_never_arrives_fails_its_group() {
        let groups = [group("first"), group("second")];
        let mut report = Report::default();
        let mut observer = GroupObserver {
            report: &mut report,
            groups: &groups,
            output: vec![Vec::new(); 2],
            reported: vec![false; 2],
            verbose: false,
        };
        observer.finished(
            0,
            &JobResult {
                outcome: machine::Outcome::Exited(0),
                elapsed: Duration::ZERO,
            },
        );
        observer.fail_unreported("its result never arrived");
        assert!(!report.all_passed());
        assert_eq!(report.summary(), "1 passed, 1 failed");
    }

    #[test]
    fn scenario_groups_fail_on_the_judges_word_even_when_the_job_exited_0() {
        let mut failing = group("conformance: r");
        failing.style = CountStyle::Scenarios(Arc::new(|_: &[String], _: &JobResult| Judged {
            counts: Counts {
                passed: 1,
                failed: 1,
                failed_names: vec!["b".into()],
                ..Counts::default()
            },
            expected: 2,
            ..Judged::default()
        }));
        let groups = [failing];
        let mut report = Report::default();
        let mut observer = GroupObserver {
            report: &mut report,
            groups: &groups,
            output: vec![Vec::new()],
            reported: vec![false],
            verbose: false,
        };
        observer.finished(
            0,
            &JobResult {
                outcome: machine::Outcome::Exited(0),
                elapsed: Duration::ZERO,
            },
        );
        assert_eq!(report.summary(), "1 passed, 1 failed");
    }
}
