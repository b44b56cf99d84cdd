//! `vpsci ctl SOCKET COMMAND [--json]`: the operator's client.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done (for `events`: the stream ended with the VM) |
//! | 1 | the VMM refused the request (a typed API error: wrong state, stopped, ...) |
//! | 2 | invalid command line |
//! | 3 | the VMM could not be reached or answered something that is not the API |
//! | 4 | `migrate`: Go was sent but the destination did not confirm; the VM is paused at the source and the operator decides (docs/migration.md) |
//!
//! Errors are one line on stderr: `vpsci ctl: KIND (STATUS): MESSAGE`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use super::client::{Client, ClientError};
use super::types::{Action, ActionDone, MigrateDone, MigrateRequest, VmInfo};

/// Exit status: the VMM refused the request.
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: no usable answer from the socket.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status: a migration's Go was sent but the destination did not
/// confirm; the VM is paused at the source, for the operator to resume or
/// power off.
pub const EXIT_UNCONFIRMED: u8 = 4;

/// Arguments of `vpsci ctl`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CtlArgs {
    /// The VMM's control socket (`vpsci run --api-socket PATH`).
    #[arg(value_name = "SOCKET")]
    pub socket: PathBuf,
    /// What to do.
    #[arg(value_enum, value_name = "COMMAND")]
    pub command: CtlCommand,
    /// `snapshot`: the directory to write (new or empty, on the VMM's host).
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// `migrate`: the destination, a `vpsci restore --listen` (`unix:PATH` or
    /// `tcp:ADDR:PORT`).
    #[arg(long, value_name = "ENDPOINT")]
    pub to: Option<String>,
    /// `migrate`: dirty-page rounds at most after the full copy (default 30).
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// `migrate`: end pre-copy once the rest would keep the VM paused no longer
    /// than this (default 300).
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Print the API's JSON instead of text (`events` prints JSON lines either way).
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for an answer (not for `events`, which runs until the VM
    /// ends); default 30, for `migrate` 600.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

/// `vpsci ctl` commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CtlCommand {
    /// Run state, vCPU power states, PSCI statistics, firmware configuration.
    Info,
    /// Hold every vCPU out of the guest.
    Pause,
    /// Let a paused VM carry on.
    Resume,
    /// Restart the VM from its image.
    Reboot,
    /// Stop the VM as SYSTEM_OFF does.
    Poweroff,
    /// Wake a system-suspended guest through its RTC.
    Wake,
    /// Print the event log's lines as they happen until the VM ends.
    Events,
    /// Write a snapshot of the VM into DIR (docs/snapshot.md); a running VM
    /// is paused for it and carries on.
    Snapshot,
    /// Send the VM to a `vpsci restore --listen` (`--to`, docs/migration.md);
    /// on success this VMM exits 0, on failure the VM runs on here; without
    /// the destination's confirmation it stays paused here (status 4).
    Migrate,
}

/// A failed `vpsci ctl`: exit status and its one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlFailure {
    /// Process exit status.
    pub status: u8,
    /// One line for stderr.
    pub message: String,
}

impl From<ClientError> for CtlFailure {
    fn from(e: ClientError) -> CtlFailure {
        let status = match e {
            ClientError::Api { .. } => EXIT_REFUSED,
            _ => EXIT_UNREACHABLE,
        };
        CtlFailure {
            status,
            message: e.to_string().replace('\n', " "),
        }
    }
}

/// Runs `args`, writing the answer to `out`.
pub fn run(args: &CtlArgs, out: &mut dyn Write) -> Result<(), CtlFailure> {
    let io = |e: std::io::Error| CtlFailure {
        status: EXIT_UNREACHABLE,
        message: format!("cannot write the answer: {e}"),
    };
    let default_wait = if args.command == CtlCommand::Migrate {
        600
    } else {
        30
    };
    let timeout = Some(Duration::from_secs(
        args.timeout.unwrap_or(default_wait).max(1),
    ));
    let action = match args.command {
        CtlCommand::Info => {
            let info = Client::new(&args.socket, timeout).info()?;
            let text = if args.json {
                serde_json::to_string_pretty(&info).unwrap_or_default() + "\n"
            } else {
                render_info(&info)
            };
            return out.write_all(text.as_bytes()).map_err(io);
        }
        CtlCommand::Events => {
            let mut failed = None;
            Client::new(&args.socket, None).events(|line| {
                let written = writeln!(out, "{line}").and_then(|()| out.flush());
                failed = written.err();
                failed.is_none()
            })?;
            return failed.map_or(Ok(()), |e| Err(io(e)));
        }
        CtlCommand::Snapshot => {
            let Some(dir) = &args.dir else {
                return Err(CtlFailure {
                    status: 2,
                    message: "snapshot needs a directory: vpsci ctl SOCKET snapshot DIR".to_owned(),
                });
            };
            let done = Client::new(&args.socket, timeout).snapshot(dir)?;
            let text = if args.json {
                serde_json::to_string(&done).unwrap_or_default() + "\n"
            } else {
                format!(
                    "snapshot: {} MiB of RAM ({} MiB stored) written to {} (pause {:.1} ms, \
                     state {:.1} ms, write {:.1} ms), the VM is {}\n",
                    done.memory_bytes >> 20,
                    done.memory_stored_bytes >> 20,
                    done.dir.display(),
                    done.pause_ms,
                    done.state_ms,
                    done.write_ms,
                    done.run_state
                )
            };
            return out.write_all(text.as_bytes()).map_err(io);
        }
        CtlCommand::Migrate => {
            let Some(to) = &args.to else {
                return Err(CtlFailure {
                    status: 2,
                    message: "migrate needs a destination: vpsci ctl SOCKET migrate --to \
                              unix:PATH|tcp:ADDR:PORT"
                        .to_owned(),
                });
            };
            let done = Client::new(&args.socket, timeout).migrate(&MigrateRequest {
                to: to.clone(),
                max_rounds: args.max_rounds,
                downtime_ms: args.downtime_ms,
            })?;
            let text = if args.json {
                serde_json::to_string(&done).unwrap_or_default() + "\n"
            } else {
                render_migrated(&done)
            };
            out.write_all(text.as_bytes()).map_err(io)?;
            if done.confirmed {
                return Ok(());
            }
            return Err(CtlFailure {
                status: EXIT_UNCONFIRMED,
                message: format!(
                    "migration to {} unconfirmed: the VM is {} here; if the destination exited 1 \
                     saying the VM did not run there: vpsci ctl {} resume; if it runs there: \
                     vpsci ctl {} poweroff",
                    done.to,
                    done.run_state,
                    args.socket.display(),
                    args.socket.display()
                ),
            });
        }
        CtlCommand::Pause => Action::Pause,
        CtlCommand::Resume => Action::Resume,
        CtlCommand::Reboot => Action::Reboot,
        CtlCommand::Poweroff => Action::Poweroff,
        CtlCommand::Wake => Action::Wake,
    };
    let done = Client::new(&args.socket, timeout).act(action)?;
    let text = if args.json {
        serde_json::to_string(&done).unwrap_or_default() + "\n"
    } else {
        render_done(&done)
    };
    out.write_all(text.as_bytes()).map_err(io)
}

/// One line for an accepted action.
pub fn render_done(done: &ActionDone) -> String {
    format!(
        "{}: done, the VM is {}\n",
        done.action.name(),
        done.run_state
    )
}

/// A finished migration as text: one line per round, then the totals.
pub fn render_migrated(done: &MigrateDone) -> String {
    let mut s = String::from(
        "round  pages sent   MiB sent      ms   MiB/s  dirty pages  device pages  dirty/s   expected downtime ms\n",
    );
    let last = done.rounds.len().saturating_sub(1);
    for (i, r) in done.rounds.iter().enumerate() {
        s += &format!(
            "{:<6} {:>10} {:>10.1} {:>7.1} {:>7.1} {:>12} {:>13} {:>8.0} {:>22.1}{}\n",
            r.round,
            r.pages_sent,
            r.bytes_sent as f64 / (1024.0 * 1024.0),
            r.ms,
            r.mib_per_s,
            r.dirty_pages,
            r.device_pages,
            r.dirty_pages_per_s,
            r.expected_downtime_ms,
            if i == last { "  (paused)" } else { "" },
        );
    }
    let mib = done.bytes_sent as f64 / (1024.0 * 1024.0);
    s += &if done.confirmed {
        format!(
            "migrated to {}: {mib:.1} MiB in {:.1} ms, downtime {:.1} ms\n",
            done.to, done.total_ms, done.downtime_ms
        )
    } else {
        format!(
            "sent to {} but not confirmed: {mib:.1} MiB in {:.1} ms; the VM is {} here \
             (paused for {:.1} ms so far)\n",
            done.to, done.total_ms, done.run_state, done.downtime_ms
        )
    };
    s
}

/// `vpsci ctl info` as text.
pub fn render_info(info: &VmInfo) -> String {
    let mut s = String::new();
    let f = &info.firmware;
    s += &format!(
        "run state: {} (restarts: {})\n",
        info.run_state, info.restarts
    );
    s += &format!(
        "firmware:  PSCI {} over {}, ON_PENDING {}, {}, answered by the {}\n",
        f.psci_version,
        f.conduit,
        if f.report_on_pending {
            "reported"
        } else {
            "hidden"
        },
        if f.frozen { "frozen" } else { "not frozen yet" },
        f.psci_backend,
    );
    if let Some(m) = &info.migration {
        s += &format!(
            "migration: to {}, {}, round {}, {} pages sent, {} dirty, expected downtime {:.1} \
             ms, {:.0} ms so far\n",
            m.to,
            m.phase.name(),
            m.round.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            m.pages_sent,
            m.dirty_pages,
            m.expected_downtime_ms,
            m.elapsed_ms
        );
    }
    s += "vcpu  mpidr       power state          standby (count, ms)  powerdown (count, ms)\n";
    for v in &info.vcpus {
        let state = v.power_state.map_or_else(
            || "(KVM's)".to_owned(),
            |p| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|j| j.as_str().map(str::to_owned))
                    .unwrap_or_default()
            },
        );
        s += &format!(
            "{:<5} {:<11} {:<20} {:>6} {:>12.3}  {:>6} {:>12.3}\n",
            v.index,
            v.mpidr,
            state,
            v.standby_count,
            v.standby_residency_ns as f64 / 1e6,
            v.powerdown_count,
            v.powerdown_residency_ns as f64 / 1e6,
        );
    }
    if info.psci_calls.is_empty() {
        s += "PSCI calls: none\n";
    } else {
        let calls: Vec<String> = info
            .psci_calls
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        s += &format!("PSCI calls: {}\n", calls.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::RunState;

    fn done(confirmed: bool, run_state: RunState) -> MigrateDone {
        MigrateDone {
            to: "unix:/tmp/m.sock".to_owned(),
            rounds: Vec::new(),
            bytes_sent: 4 << 20,
            total_ms: 500.0,
            downtime_ms: 50.0,
            confirmed,
            run_state,
        }
    }

    #[test]
    fn an_unconfirmed_migration_reads_as_sent_and_paused_not_as_migrated() {
        let confirmed = render_migrated(&done(true, RunState::Stopping));
        assert!(
            confirmed
                .ends_with("migrated to unix:/tmp/m.sock: 4.0 MiB in 500.0 ms, downtime 50.0 ms\n"),
            "{confirmed}"
        );
        let unconfirmed = render_migrated(&done(false, RunState::Paused));
        let last = unconfirmed.lines().last().unwrap_or_default();
        assert!(!last.contains("migrated to"), "{last}");
        assert!(
            last.starts_with("sent to unix:/tmp/m.sock but not confirmed")
                && last.contains("the VM is paused here"),
            "{last}"
        );
    }
}
