//! The `vpsci` command line: parsing (clap derive) and validation into a
//! [`RunConfig`].
//!
//! ```text
//! vpsci run --image FILE [--initrd FILE] [--cmdline STR] [--cpus N]
//!           [--memory SIZE] [--psci-version 0.2|1.0|1.1|1.2|1.3]
//!           [--conduit hvc|smc] [--events FILE] [--on-reset exit|restart]
//!           [--on-hibernate poweroff|refuse] [--timeout SECS] [--in-kernel-psci]
//!           [--report-on-pending] [--disk FILE[,readonly]]... [--api-socket PATH]
//! vpsci ctl SOCKET info|pause|resume|reboot|poweroff|wake|events [--json] [--timeout SECS]
//! ```
//!
//! Every invalid input becomes a [`CliError`] whose message is one line;
//! nothing here panics on operator input.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

pub use crate::api::ctl::CtlArgs;
use crate::devices::virtio_blk::{DiskSpec, DiskSpecError};
use crate::devices::virtio_blk_image::DiskIdentity;
use crate::layout::{GuestLayout, LayoutError, MAX_VIRTIO_DEVICES};
pub use crate::migrate::Endpoint;

use vpsci_firmware::{Conduit, OnPending, PsciVersion, SystemEvent};

/// Default vCPU count.
pub const DEFAULT_CPUS: u32 = 1;
/// Default RAM size.
pub const DEFAULT_MEMORY: &str = "256M";

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "vpsci",
    version,
    about = "arm64 VMM whose PSCI firmware lives in userspace"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest image.
    Run(RunArgs),
    /// Draw an event log (`vpsci run --events`) as an SVG power-state timeline: one lane
    /// per vCPU coloured by power state, PSCI calls and system events marked.
    Timeline(TimelineArgs),
    /// Resume a VM from a snapshot directory, or receive one live migration
    /// (`--listen`), in this new process (the guest keeps the firmware it was
    /// given: PSCI version, functions, conduit).
    Restore(RestoreArgs),
    /// Talk to a running VMM's control API (`vpsci run --api-socket`): info, pause,
    /// resume, reboot, poweroff, wake, events, snapshot, migrate. Exit status 0 done, 1 refused by the VMM,
    /// 2 bad command line, 3 VMM unreachable.
    Ctl(CtlArgs),
}

/// Arguments of `vpsci timeline`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TimelineArgs {
    /// The event log (JSON lines).
    #[arg(value_name = "EVENTS")]
    pub events: PathBuf,
    /// Where to write the SVG.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// What the VMM does when the guest calls SYSTEM_RESET / SYSTEM_RESET2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ResetAction {
    /// Stop the VM and exit (status reports the reset).
    #[default]
    Exit,
    /// Reset the VM and boot the image again.
    Restart,
}

/// What the VMM does when the guest calls SYSTEM_OFF2 with HIBERNATE_OFF
/// (DEN0022 §5.1.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum HibernateAction {
    /// Power the VM off and exit 0, as for SYSTEM_OFF.
    #[default]
    #[value(name = "poweroff")]
    PowerOff,
    /// Keep the VM running (for a VMM that cannot keep a hibernation
    /// image): the caller gets INTERNAL_FAILURE (the engine's `fallback` for
    /// a SYSTEM_OFF2 caller that runs on) and every vCPU carries on.
    Refuse,
}

impl HibernateAction {
    /// Whether this policy refuses `event`: only a hibernate request under
    /// [`HibernateAction::Refuse`]; SYSTEM_OFF, SYSTEM_OFF2 type 0 and every
    /// reset are never refused.
    pub fn refuses(self, event: &SystemEvent) -> bool {
        self == HibernateAction::Refuse && *event == SystemEvent::Hibernate
    }
}

/// Raw arguments of `vpsci run`, before validation.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Guest image: raw binary, ELF64 aarch64, or Linux arm64 Image
    /// (`--kernel` is the same option).
    #[arg(long, visible_alias = "kernel", value_name = "FILE")]
    pub image: PathBuf,
    /// Initial ramdisk for a Linux guest.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (device tree /chosen/bootargs).
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CPUS)]
    pub cpus: u32,
    /// Guest RAM size: a number with an optional K, M, G or T suffix
    /// (binary units; a bare number means MiB, as in QEMU's -m).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEMORY)]
    pub memory: String,
    /// PSCI version the firmware reports: 0.2, 1.0, 1.1, 1.2 or 1.3.
    #[arg(long, value_name = "VERSION", default_value = "1.3")]
    pub psci_version: PsciVersion,
    /// Firmware call conduit: hvc or smc.
    #[arg(long, value_name = "CONDUIT", default_value = "hvc")]
    pub conduit: Conduit,
    /// Write the event log (JSON lines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// What a guest SYSTEM_RESET does.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = ResetAction::Exit)]
    pub on_reset: ResetAction,
    /// What a guest SYSTEM_OFF2(HIBERNATE_OFF) does: power off, or refuse it
    /// (the guest sees INTERNAL_FAILURE and keeps running).
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = HibernateAction::PowerOff)]
    pub on_hibernate: HibernateAction,
    /// Stop the VM after SECS seconds (whole seconds, at least 1).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Let KVM's in-kernel PSCI implementation handle PSCI instead of vpsci's engine.
    #[arg(long)]
    pub in_kernel_psci: bool,
    /// Answer ON_PENDING (TF-A's reading of PSCI) for a CPU whose CPU_ON succeeded but
    /// which has not run yet: CPU_ON from other callers and AFFINITY_INFO say so. Default:
    /// KVM's answers (ALREADY_ON and ON), which guests written for KVM expect.
    #[arg(long)]
    pub report_on_pending: bool,
    /// A raw disk image the guest sees as a virtio block device (virtio-mmio);
    /// `,readonly` makes it read only. Repeat for more disks (at most 8).
    #[arg(long, value_name = "FILE[,readonly]")]
    pub disk: Vec<String>,
    /// When the guest's console output contains MARKER, pause the VM, write a
    /// snapshot into `--snapshot-dir` and stop (exit status 0); `vpsci
    /// restore DIR` resumes it. For scripted snapshots at a point the guest
    /// chooses.
    #[arg(long, value_name = "MARKER", requires = "snapshot_dir")]
    pub snapshot_on_console: Option<String>,
    /// Like `--snapshot-on-console`, when the guest has suspended the whole
    /// VM (SYSTEM_SUSPEND): the snapshot holds a system-suspended VM, which
    /// wakes after the restore.
    #[arg(
        long,
        requires = "snapshot_dir",
        conflicts_with = "snapshot_on_console"
    )]
    pub snapshot_on_system_suspend: bool,
    /// Directory (new or empty) for `--snapshot-on-console` or
    /// `--snapshot-on-system-suspend`.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.md) on this Unix socket:
    /// `vpsci ctl PATH info|pause|resume|reboot|poweroff|wake|events`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Debugging and test aid, hidden from the help: a CPU_ON the engine
    /// commits never runs (its target stays ON_PENDING), so that
    /// `--snapshot-on-console` can save a start committed but not yet run.
    #[arg(long, hide = true)]
    pub hold_starts: bool,
}

/// Raw arguments of `vpsci restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory (written by `--snapshot-on-console` or `vpsci ctl
    /// snapshot`).
    #[arg(
        value_name = "DIR",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    pub dir: Option<PathBuf>,
    /// Wait for one VM migrated here (`vpsci ctl SOCKET migrate --to ...`,
    /// docs/migration.md) instead of reading a directory: `unix:PATH` or
    /// `tcp:ADDR:PORT`.
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Option<String>,
    /// Write the event log (JSON lines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Stop the VM after SECS seconds (whole seconds, at least 1).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// What a guest SYSTEM_OFF2(HIBERNATE_OFF) does.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = HibernateAction::PowerOff)]
    pub on_hibernate: HibernateAction,
    /// Ask for KVM's in-kernel PSCI on the restored VM. A snapshot's guest
    /// was given vpsci's firmware, which KVM's PSCI cannot offer: the restore
    /// is refused (this flag exists so that refusal can be shown).
    #[arg(long)]
    pub in_kernel_psci: bool,
    /// Serve the control API on this Unix socket once the VM runs, as `vpsci
    /// run --api-socket` does.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

/// Where `vpsci restore` takes its VM from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreSource {
    /// A snapshot directory.
    Dir(PathBuf),
    /// One incoming live migration.
    Listen(Endpoint),
}

/// A validated `vpsci restore` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// Where the VM comes from.
    pub source: RestoreSource,
    /// Event log file, if any.
    pub events: Option<PathBuf>,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
    /// What SYSTEM_OFF2(HIBERNATE_OFF) does.
    pub on_hibernate: HibernateAction,
    /// KVM's in-kernel PSCI was asked for (the restore is refused).
    pub in_kernel_psci: bool,
    /// The control API's socket, if any.
    pub api_socket: Option<PathBuf>,
}

impl RestoreArgs {
    /// Checks the arguments.
    pub fn validate(self) -> Result<RestoreConfig, CliError> {
        let timeout = match self.timeout {
            Some(0) => return Err(CliError::ZeroTimeout),
            Some(secs) => Some(Duration::from_secs(secs)),
            None => None,
        };
        let source = match (self.dir, self.listen) {
            (_, Some(endpoint)) => {
                RestoreSource::Listen(endpoint.parse().map_err(CliError::Endpoint)?)
            }
            (Some(dir), None) => RestoreSource::Dir(dir),
            (None, None) => {
                return Err(CliError::Endpoint(
                    "vpsci restore needs DIR or --listen".to_owned(),
                ))
            }
        };
        Ok(RestoreConfig {
            source,
            events: self.events,
            timeout,
            on_hibernate: self.on_hibernate,
            in_kernel_psci: self.in_kernel_psci,
            api_socket: self.api_socket,
        })
    }
}

/// A validated `vpsci run` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Guest image file.
    pub image: PathBuf,
    /// Initrd file, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count and RAM size, checked against the memory map.
    pub layout: GuestLayout,
    /// PSCI version to expose.
    pub psci_version: PsciVersion,
    /// Firmware call conduit.
    pub conduit: Conduit,
    /// Event log file, if any.
    pub events: Option<PathBuf>,
    /// What SYSTEM_RESET does.
    pub on_reset: ResetAction,
    /// What SYSTEM_OFF2(HIBERNATE_OFF) does.
    pub on_hibernate: HibernateAction,
    /// Wall-clock limit for the run.
    pub timeout: Option<Duration>,
    /// Use KVM's in-kernel PSCI instead of the userspace engine.
    pub in_kernel_psci: bool,
    /// How a started but not yet running CPU is reported to the guest.
    pub on_pending: OnPending,
    /// Disk images, in the order of their virtio-mmio slots.
    pub disks: Vec<DiskSpec>,
    /// Snapshot and stop at a guest-chosen point.
    pub snapshot: Option<SnapshotTrigger>,
    /// The control API's socket, if any.
    pub api_socket: Option<PathBuf>,
    /// Started vCPUs never run (`--hold-starts`, a hidden debugging aid).
    pub hold_starts: bool,
}

/// When `vpsci run` takes its snapshot (then stops).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTrigger {
    /// The event.
    pub when: SnapshotWhen,
    /// Where the snapshot goes.
    pub dir: PathBuf,
}

/// The event a [`SnapshotTrigger`] waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotWhen {
    /// The console output contains this marker.
    Console(String),
    /// The guest suspended the VM (SYSTEM_SUSPEND committed).
    SystemSuspend,
}

/// A memory size string that cannot be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// No digits.
    #[error("memory size {input:?} has no number")]
    NoNumber {
        /// What the operator wrote.
        input: String,
    },
    /// A suffix other than K, M, G, T (optionally followed by "iB" or "B").
    #[error("memory size {input:?} has an unknown unit (use K, M, G or T)")]
    BadUnit {
        /// What the operator wrote.
        input: String,
    },
    /// The value does not fit in 64 bits.
    #[error("memory size {input:?} is too large")]
    Overflow {
        /// What the operator wrote.
        input: String,
    },
}

/// An invalid command line. Every message is a single line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    /// clap rejected the arguments (unknown flag, missing value, not a number...).
    #[error("{message}")]
    Usage {
        /// clap's first error line, without its "error: " prefix.
        message: String,
    },
    /// `--memory` did not parse.
    #[error("--memory: {0}")]
    Memory(#[from] SizeError),
    /// `--cpus`/`--memory` do not fit the memory map.
    #[error("{0}")]
    Layout(#[from] LayoutError),
    /// `--timeout 0`.
    #[error("--timeout: must be at least 1 second")]
    ZeroTimeout,
    /// A migration endpoint (`--listen`) that does not parse.
    #[error("--listen: {0}")]
    Endpoint(String),
    /// `--on-hibernate refuse` together with `--in-kernel-psci`.
    #[error(
        "--on-hibernate refuse needs vpsci's PSCI engine: with --in-kernel-psci KVM stops \
         every vCPU before it reports SYSTEM_OFF2"
    )]
    RefuseNeedsEngine,
    /// A `--disk` value that does not parse.
    #[error("--disk: {0}")]
    Disk(#[from] DiskSpecError),
    /// The same image given to two `--disk` options.
    #[error("--disk: {path} is given twice (two devices on one image would corrupt it)")]
    DiskTwice {
        /// The image.
        path: String,
    },
    /// More `--disk` options than virtio-mmio slots.
    #[error("--disk: {given} disks given, at most {max} are supported")]
    TooManyDisks {
        /// How many were given.
        given: usize,
        /// The limit.
        max: usize,
    },
    /// `--report-on-pending` together with `--in-kernel-psci`.
    #[error("--report-on-pending needs vpsci's PSCI engine: KVM's PSCI never answers ON_PENDING")]
    OnPendingNeedsEngine,
}

/// Parses a memory size: digits, then an optional K/M/G/T unit (binary,
/// case-insensitive, optionally followed by "B" or "iB"). A bare number is MiB.
pub fn parse_memory_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NoNumber {
            input: input.to_owned(),
        });
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(SizeError::BadUnit {
                input: input.to_owned(),
            })
        }
    };
    let overflow = || SizeError::Overflow {
        input: input.to_owned(),
    };
    let value: u64 = digits.parse().map_err(|_| overflow())?;
    value.checked_mul(1 << shift).ok_or_else(overflow)
}

impl RunArgs {
    /// Checks every argument and builds the run configuration.
    pub fn validate(self) -> Result<RunConfig, CliError> {
        let memory = parse_memory_size(&self.memory)?;
        let layout = GuestLayout::new(self.cpus, memory)?;
        let timeout = match self.timeout {
            Some(0) => return Err(CliError::ZeroTimeout),
            Some(secs) => Some(Duration::from_secs(secs)),
            None => None,
        };
        // KVM's own SYSTEM_OFF2 marks every vCPU stopped before it exits to
        // us, so a refusal could not give the guest back the VM it called from.
        if self.in_kernel_psci && self.on_hibernate == HibernateAction::Refuse {
            return Err(CliError::RefuseNeedsEngine);
        }
        if self.in_kernel_psci && self.report_on_pending {
            return Err(CliError::OnPendingNeedsEngine);
        }
        let disks = parse_disks(&self.disk)?;
        Ok(RunConfig {
            image: self.image,
            initrd: self.initrd,
            cmdline: self.cmdline,
            layout,
            psci_version: self.psci_version,
            conduit: self.conduit,
            events: self.events,
            on_reset: self.on_reset,
            on_hibernate: self.on_hibernate,
            timeout,
            in_kernel_psci: self.in_kernel_psci,
            on_pending: if self.report_on_pending {
                OnPending::Reported
            } else {
                OnPending::Hidden
            },
            disks,
            snapshot: match (self.snapshot_on_console, self.snapshot_on_system_suspend) {
                (Some(marker), _) => self.snapshot_dir.map(|dir| SnapshotTrigger {
                    when: SnapshotWhen::Console(marker),
                    dir,
                }),
                (None, true) => self.snapshot_dir.map(|dir| SnapshotTrigger {
                    when: SnapshotWhen::SystemSuspend,
                    dir,
                }),
                (None, false) => None,
            },
            api_socket: self.api_socket,
            hold_starts: self.hold_starts,
        })
    }
}

/// Parses every `--disk` value and refuses one image given twice: by the
/// same name, or by two names of one existing file (symbolic or hard links).
fn parse_disks(values: &[String]) -> Result<Vec<DiskSpec>, CliError> {
    if values.len() > MAX_VIRTIO_DEVICES {
        return Err(CliError::TooManyDisks {
            given: values.len(),
            max: MAX_VIRTIO_DEVICES,
        });
    }
    let mut disks: Vec<DiskSpec> = Vec::with_capacity(values.len());
    let mut seen = Vec::with_capacity(values.len());
    for value in values {
        let disk: DiskSpec = value.parse()?;
        let key = DiskIdentity::of_path(&disk.path);
        if seen.contains(&key) {
            return Err(CliError::DiskTwice {
                path: disk.path.display().to_string(),
            });
        }
        seen.push(key);
        disks.push(disk);
    }
    Ok(disks)
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a VM.
    Run(Box<RunConfig>),
    /// Restore a VM from a snapshot and run it.
    Restore(RestoreConfig),
    /// Draw a timeline.
    Timeline(TimelineArgs),
    /// Talk to a VMM's control API.
    Ctl(CtlArgs),
    /// Print this text (help or version) to stdout and exit successfully.
    Print(String),
}

/// Parses and validates `args` (the first item is the program name).
pub fn parse_from<I, T>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(Cli {
            command: Command::Run(run),
        }) => Ok(Action::Run(Box::new(run.validate()?))),
        Ok(Cli {
            command: Command::Timeline(args),
        }) => Ok(Action::Timeline(args)),
        Ok(Cli {
            command: Command::Restore(args),
        }) => Ok(Action::Restore(args.validate()?)),
        Ok(Cli {
            command: Command::Ctl(args),
        }) => Ok(Action::Ctl(args)),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                Ok(Action::Print(e.render().to_string()))
            }
            // Bare `vpsci`: clap would print the whole help as an "error".
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Err(CliError::Usage {
                    message: "no command given (try 'vpsci --help')".to_owned(),
                })
            }
            _ => Err(CliError::Usage {
                message: first_error_line(&e.render().to_string()),
            }),
        },
    }
}

/// Parses the process's arguments. Help/version are printed and the process
/// exits 0; an invalid command line prints one `vpsci: ...` line to stderr and
/// exits 2. Otherwise the action is [`Action::Run`] or [`Action::Timeline`].
pub fn parse() -> Action {
    match parse_from(std::env::args_os()) {
        Ok(Action::Print(text)) => {
            print!("{text}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("vpsci: {e}");
            std::process::exit(2)
        }
        Ok(action) => action,
    }
}

/// clap's message up to its first blank line (the error and its details,
/// without usage and tips), folded onto one line.
fn first_error_line(rendered: &str) -> String {
    let folded = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = folded.strip_prefix("error: ").unwrap_or(&folded);
    if message.is_empty() {
        "invalid command line".to_owned()
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, CliError> {
        let mut full = vec!["vpsci", "run"];
        full.extend_from_slice(args);
        match parse_from(full)? {
            Action::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn restore_takes_a_directory_and_the_run_options_it_shares() {
        let parsed = parse_from(["vpsci", "restore", "snap", "--timeout", "5"]);
        assert_eq!(
            parsed,
            Ok(Action::Restore(RestoreConfig {
                source: RestoreSource::Dir(PathBuf::from("snap")),
                events: None,
                timeout: Some(Duration::from_secs(5)),
                on_hibernate: HibernateAction::PowerOff,
                in_kernel_psci: false,
                api_socket: None,
            }))
        );
        assert!(parse_from(["vpsci", "restore"]).is_err());
    }

    #[test]
    fn restore_listens_for_a_migration_instead_of_reading_a_directory() {
        let parsed = parse_from([
            "vpsci",
            "restore",
            "--listen",
            "tcp:127.0.0.1:4444",
            "--api-socket",
            "api.sock",
        ]);
        assert_eq!(
            parsed.map(|a| match a {
                Action::Restore(c) => (c.source, c.api_socket),
                other => panic!("{other:?}"),
            }),
            Ok((
                RestoreSource::Listen(Endpoint::Tcp("127.0.0.1:4444".to_owned())),
                Some(PathBuf::from("api.sock"))
            ))
        );
        assert!(parse_from(["vpsci", "restore", "snap", "--listen", "unix:/tmp/m"]).is_err());
        assert!(parse_from(["vpsci", "restore", "--listen", "udp:1.2.3.4:5"]).is_err());
    }

    #[test]
    fn a_snapshot_trigger_needs_a_directory_and_only_one_trigger_is_allowed() {
        let c = run(&[
            "--image",
            "x",
            "--snapshot-on-console",
            "M",
            "--snapshot-dir",
            "d",
        ]);
        assert_eq!(
            c.map(|c| c.snapshot),
            Ok(Some(SnapshotTrigger {
                when: SnapshotWhen::Console("M".to_owned()),
                dir: PathBuf::from("d"),
            }))
        );
        let c = run(&[
            "--image",
            "x",
            "--snapshot-on-system-suspend",
            "--snapshot-dir",
            "d",
        ]);
        assert_eq!(
            c.map(|c| c.snapshot.map(|t| t.when)),
            Ok(Some(SnapshotWhen::SystemSuspend))
        );
        assert!(run(&["--image", "x", "--snapshot-on-console", "M"]).is_err());
        assert!(run(&[
            "--image",
            "x",
            "--snapshot-on-console",
            "M",
            "--snapshot-on-system-suspend",
            "--snapshot-dir",
            "d"
        ])
        .is_err());
        assert_eq!(run(&["--image", "x"]).map(|c| c.snapshot), Ok(None));
    }

    #[test]
    fn defaults_are_one_cpu_256m_psci_1_3_hvc_exit_no_timeout() {
        let c = run(&["--image", "a.bin"]).unwrap();
        assert_eq!(c.image, PathBuf::from("a.bin"));
        assert_eq!(c.layout.cpus(), 1);
        assert_eq!(c.layout.ram_size(), 256 << 20);
        assert_eq!(c.psci_version, PsciVersion::V1_3);
        assert_eq!(c.conduit, Conduit::Hvc);
        assert_eq!(c.on_reset, ResetAction::Exit);
        assert_eq!(c.on_hibernate, HibernateAction::PowerOff);
        assert_eq!(c.timeout, None);
        assert_eq!(c.events, None);
        assert_eq!(c.initrd, None);
        assert_eq!(c.cmdline, "");
        assert!(!c.in_kernel_psci);
    }

    #[test]
    fn every_option_is_carried_into_the_config() {
        let c = run(&[
            "--image",
            "k",
            "--initrd",
            "i",
            "--cmdline",
            "console=ttyAMA0 quiet",
            "--cpus",
            "8",
            "--memory",
            "1G",
            "--psci-version",
            "0.2",
            "--conduit",
            "smc",
            "--events",
            "ev.jsonl",
            "--on-reset",
            "restart",
            "--on-hibernate",
            "poweroff",
            "--timeout",
            "30",
            "--in-kernel-psci",
        ])
        .unwrap();
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!(c.cmdline, "console=ttyAMA0 quiet");
        assert_eq!(c.layout.cpus(), 8);
        assert_eq!(c.layout.ram_size(), 1 << 30);
        assert_eq!(c.psci_version, PsciVersion::V0_2);
        assert_eq!(c.conduit, Conduit::Smc);
        assert_eq!(c.events, Some(PathBuf::from("ev.jsonl")));
        assert_eq!(c.on_reset, ResetAction::Restart);
        assert_eq!(c.on_hibernate, HibernateAction::PowerOff);
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert!(c.in_kernel_psci);
    }

    #[test]
    fn all_psci_versions_parse() {
        for (s, v) in [
            ("0.2", PsciVersion::V0_2),
            ("1.0", PsciVersion::V1_0),
            ("1.1", PsciVersion::V1_1),
            ("1.2", PsciVersion::V1_2),
            ("1.3", PsciVersion::V1_3),
        ] {
            assert_eq!(
                run(&["--image", "a", "--psci-version", s])
                    .unwrap()
                    .psci_version,
                v
            );
            assert_eq!(v.to_string(), s);
        }
    }

    #[test]
    fn memory_sizes_parse_with_binary_units() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("512"), Ok(512 << 20));
        assert_eq!(parse_memory_size("1G"), Ok(1 << 30));
        assert_eq!(parse_memory_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_memory_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_memory_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn bad_memory_sizes_are_typed_errors() {
        assert!(matches!(
            parse_memory_size("G"),
            Err(SizeError::NoNumber { .. })
        ));
        assert!(matches!(
            parse_memory_size(""),
            Err(SizeError::NoNumber { .. })
        ));
        assert!(matches!(
            parse_memory_size("-1G"),
            Err(SizeError::NoNumber { .. })
        ));
        assert!(matches!(
            parse_memory_size("12X"),
            Err(SizeError::BadUnit { .. })
        ));
        assert!(matches!(
            parse_memory_size("1.5G"),
            Err(SizeError::BadUnit { .. })
        ));
        assert!(matches!(
            parse_memory_size("99999999999999999999"),
            Err(SizeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_memory_size("17179869184T"),
            Err(SizeError::Overflow { .. })
        ));
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        assert!(matches!(
            run(&["--image", "a", "--cpus", "0"]),
            Err(CliError::Layout(LayoutError::NoCpus))
        ));
        assert!(matches!(
            run(&["--image", "a", "--cpus", "513"]),
            Err(CliError::Layout(LayoutError::TooManyCpus { .. }))
        ));
        assert!(run(&["--image", "a", "--cpus", "512"]).is_ok());
        assert!(matches!(
            run(&["--image", "a", "--memory", "1M"]),
            Err(CliError::Layout(LayoutError::RamTooSmall { .. }))
        ));
        // Parsed by clap through the engine's FromStr: the engine's own message.
        assert!(matches!(
            run(&["--image", "a", "--psci-version", "0.1"]),
            Err(CliError::Usage { message })
                if message.contains("--psci-version") && message.contains("expected one of 0.2, 1.0, 1.1, 1.2, 1.3")
        ));
        assert!(matches!(
            run(&["--image", "a", "--conduit", "svc"]),
            Err(CliError::Usage { message })
                if message.contains("--conduit") && message.contains("expected \"hvc\" or \"smc\"")
        ));
        assert_eq!(
            run(&["--image", "a", "--in-kernel-psci", "--report-on-pending"]),
            Err(CliError::OnPendingNeedsEngine)
        );
        assert_eq!(
            run(&["--image", "a", "--timeout", "0"]),
            Err(CliError::ZeroTimeout)
        );
    }

    #[test]
    fn every_bad_input_gives_a_single_line_message() {
        let cases: &[&[&str]] = &[
            &[],
            &["--image"],
            &["--image", "a", "--cpus", "many"],
            &["--image", "a", "--cpus", "-3"],
            &["--image", "a", "--bogus"],
            &["--image", "a", "--on-reset", "reboot"],
            &["--image", "a", "--on-hibernate", "ignore"],
            &["--image", "a", "--on-hibernate", "power-off"],
            &[
                "--image",
                "a",
                "--on-hibernate",
                "refuse",
                "--in-kernel-psci",
            ],
            &["--image", "a", "--memory", "lots"],
            &["--image", "a", "--memory", "3M"],
            &["--image", "a", "--psci-version", "2.0"],
            &["--image", "a", "--conduit", "HVC"],
            &["--image", "a", "--timeout", "-1"],
            &["--image", "a", "--report-on-pending", "--in-kernel-psci"],
        ];
        for args in cases {
            let err = run(args).expect_err("must be rejected");
            let msg = err.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "{args:?} gave {msg:?}"
            );
        }
    }

    #[test]
    fn timeline_takes_an_event_log_and_an_output_file() {
        assert_eq!(
            parse_from(["vpsci", "timeline", "ev.jsonl", "-o", "t.svg"]),
            Ok(Action::Timeline(TimelineArgs {
                events: PathBuf::from("ev.jsonl"),
                output: PathBuf::from("t.svg"),
            }))
        );
        assert!(matches!(
            parse_from(["vpsci", "timeline", "ev.jsonl"]),
            Err(CliError::Usage { message }) if message.contains("--output")
        ));
    }

    #[test]
    fn cpu_on_answers_default_to_kvms_and_report_on_pending_is_an_option() {
        assert_eq!(
            run(&["--image", "a"]).unwrap().on_pending,
            OnPending::Hidden
        );
        assert_eq!(
            run(&["--image", "a", "--report-on-pending"])
                .unwrap()
                .on_pending,
            OnPending::Reported
        );
    }

    #[test]
    fn on_hibernate_accepts_poweroff_and_refuse() {
        for (arg, action) in [
            ("poweroff", HibernateAction::PowerOff),
            ("refuse", HibernateAction::Refuse),
        ] {
            let c = run(&["--image", "a", "--on-hibernate", arg]).unwrap();
            assert_eq!(c.on_hibernate, action, "{arg}");
        }
    }

    #[test]
    fn on_hibernate_rejects_other_words_naming_the_choices() {
        let err = run(&["--image", "a", "--on-hibernate", "ignore"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--on-hibernate"), "{err}");
        assert!(err.contains("poweroff") && err.contains("refuse"), "{err}");
    }

    #[test]
    fn refusing_hibernation_under_in_kernel_psci_is_rejected() {
        assert_eq!(
            run(&[
                "--image",
                "a",
                "--on-hibernate",
                "refuse",
                "--in-kernel-psci"
            ]),
            Err(CliError::RefuseNeedsEngine)
        );
        // Powering off is what KVM does anyway: allowed.
        assert!(run(&[
            "--image",
            "a",
            "--on-hibernate",
            "poweroff",
            "--in-kernel-psci"
        ])
        .is_ok());
    }

    #[test]
    fn only_a_hibernate_request_under_refuse_is_refused() {
        let others = [
            SystemEvent::Off,
            SystemEvent::Reset,
            SystemEvent::WarmReset { cookie: 0 },
            SystemEvent::VendorReset {
                reset_type: 0x8000_0000,
                cookie: 1,
            },
        ];
        assert!(HibernateAction::Refuse.refuses(&SystemEvent::Hibernate));
        assert!(!HibernateAction::PowerOff.refuses(&SystemEvent::Hibernate));
        for event in others {
            assert!(!HibernateAction::Refuse.refuses(&event), "{event:?}");
            assert!(!HibernateAction::PowerOff.refuses(&event), "{event:?}");
        }
    }

    #[test]
    fn hold_starts_is_off_by_default_and_hidden_from_the_help() {
        assert_eq!(run(&["--image", "x"]).map(|c| c.hold_starts), Ok(false));
        assert_eq!(
            run(&["--image", "x", "--hold-starts"]).map(|c| c.hold_starts),
            Ok(true)
        );
        match parse_from(["vpsci", "run", "--help"]) {
            Ok(Action::Print(text)) => assert!(!text.contains("hold-starts"), "{text}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn help_lists_the_hibernate_choices() {
        match parse_from(["vpsci", "run", "--help"]) {
            Ok(Action::Print(text)) => {
                assert!(text.contains("--on-hibernate"), "{text}");
                assert!(
                    text.contains("poweroff") && text.contains("refuse"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn disks_are_taken_in_order_with_their_readonly_option() {
        let c = run(&[
            "--image",
            "a",
            "--disk",
            "x.img",
            "--disk",
            "y.img,readonly",
        ])
        .unwrap();
        assert_eq!(
            c.disks,
            vec![
                DiskSpec {
                    path: PathBuf::from("x.img"),
                    readonly: false
                },
                DiskSpec {
                    path: PathBuf::from("y.img"),
                    readonly: true
                }
            ]
        );
        assert!(run(&["--image", "a"]).unwrap().disks.is_empty());
    }

    #[test]
    fn a_disk_given_twice_is_refused_by_name_and_through_symbolic_and_hard_links() {
        assert_eq!(
            run(&[
                "--image",
                "a",
                "--disk",
                "x.img",
                "--disk",
                "x.img,readonly"
            ]),
            Err(CliError::DiskTwice {
                path: "x.img".to_owned()
            })
        );
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("disk.img");
        std::fs::write(&real, [0u8; 512]).unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = run(&[
            "--image",
            "a",
            "--disk",
            real.to_str().unwrap(),
            "--disk",
            link.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(matches!(err, CliError::DiskTwice { .. }), "{err}");
        // A hard link has a canonical path of its own: the same inode tells.
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&real, &hard).unwrap();
        let err = run(&[
            "--image",
            "a",
            "--disk",
            real.to_str().unwrap(),
            "--disk",
            hard.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(matches!(err, CliError::DiskTwice { .. }), "{err}");
        assert_eq!(std::fs::read(&real).unwrap(), [0u8; 512], "nothing written");
    }

    #[test]
    fn bad_disk_values_are_one_line_errors_naming_the_option() {
        for value in ["x.img,rw", "x.img,", ",readonly", ""] {
            let err = run(&["--image", "a", "--disk", value])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("--disk: "), "{value:?}: {err}");
            assert!(!err.contains('\n'));
        }
        let nine: Vec<String> = (0..9).map(|i| format!("d{i}.img")).collect();
        let mut args = vec!["--image", "a"];
        for d in &nine {
            args.extend(["--disk", d.as_str()]);
        }
        assert_eq!(run(&args), Err(CliError::TooManyDisks { given: 9, max: 8 }));
    }

    #[test]
    fn kernel_is_another_name_for_image() {
        let c = run(&["--kernel", "Image"]).unwrap();
        assert_eq!(c.image, PathBuf::from("Image"));
        let err = run(&["--kernel", "a", "--image", "b"]).unwrap_err();
        assert!(err.to_string().contains("--image"), "{err}");
    }

    #[test]
    fn missing_image_names_the_flag() {
        let err = run(&[]).unwrap_err().to_string();
        assert!(err.contains("--image"), "{err}");
    }

    #[test]
    fn bare_command_is_a_one_line_error() {
        let err = parse_from(["vpsci"]).unwrap_err();
        assert_eq!(err.to_string(), "no command given (try 'vpsci --help')");
    }

    #[test]
    fn help_is_printed_not_an_error() {
        match parse_from(["vpsci", "run", "--help"]) {
            Ok(Action::Print(text)) => assert!(text.contains("--psci-version")),
            other => panic!("{other:?}"),
        }
    }
}
