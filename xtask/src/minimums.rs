//! How many tests each group of `cargo xtask test` must at least run (passed, failed and
//! skipped tests all count; filtered-out tests do not).
//!
//! A group that reports fewer fails, even if every test it ran passed: tests that silently
//! stop existing or running (a `cfg` that no longer matches, an overridden `RUSTFLAGS` that
//! drops `--cfg loom`, a binary that exits 0 before its harness runs) must not look green.
//! Raise a minimum when a group gains tests; lower it only when tests are removed on
//! purpose. A group not listed here must run at least one test. Conformance groups are not
//! listed: each must judge every scenario its run plans (`crate::conformance`).

/// (group name as `cargo xtask test` prints it, minimum number of tests), as counted in
/// the last full run (2026-12-01 06:35 UTC, main with the api, snap, linux, hostile and bench
/// work merged: native 520, loom 8, the KVM binaries exactly these), then on purpose: the
/// disk-snapshot work folded snapshot_format's refusal tests into one table (13 -> 7) and added
/// 5 lib unit tests and nested_linux_disk_snapshot (native 520 - 6 + 5); the linux-snapshot
/// work added nested_linux_snapshot, two held-start tests to nested_snapshot (5 -> 7) and two
/// lib unit tests (140 -> 142, counted in the nested machine). Then the counts of the full
/// run of 2026-12-01 10:05 UTC with the migration work merged (native 535, vpsci lib 145,
/// vpsci-kvm lib 15, nested_backend 6, nested_migration 9 + 1 measurement, migration_wire 8).
/// Then the API-during-migration work added api_migrating (8) and two lib unit tests (145 ->
/// 147), all also run natively (535 -> 545), and one nested_migration test. The
/// sparse-snapshot work added 8 lib unit tests (memory.rs, snapshot/sparse.rs: 147 -> 155)
/// and one snapshot_format test (7 -> 8), all also native (545 -> 554).
const MINIMUM_TESTS: &[(&str, u64)] = &[
    ("native tests (host)", 554),
    ("loom model checks (firmware)", 8),
    ("miri (firmware unit tests)", 31),
    ("KVM tests: vpsci-kvm (lib unit tests)", 15),
    ("KVM tests: vpsci-kvm (test nested_backend)", 6),
    ("KVM tests: vpsci-kvm (test nested_vm_state)", 3),
    ("KVM tests: vpsci (lib unit tests)", 155),
    // main.rs has no tests of its own.
    ("KVM tests: vpsci (bin unit tests)", 0),
    ("KVM tests: vpsci (test api)", 21),
    ("KVM tests: vpsci (test api_migrating)", 8),
    ("KVM tests: vpsci (test assembly)", 1),
    ("KVM tests: vpsci (test cli_binary)", 3),
    ("KVM tests: vpsci (test events)", 5),
    ("KVM tests: vpsci (test exit_handling)", 18),
    ("KVM tests: vpsci (test fdt)", 13),
    ("KVM tests: vpsci (test fdt_idle_states)", 2),
    ("KVM tests: vpsci (test hibernate_engine)", 2),
    ("KVM tests: vpsci (test loader)", 22),
    ("KVM tests: vpsci (test nested_api)", 2),
    ("KVM tests: vpsci (test nested_boot)", 8),
    ("KVM tests: vpsci (test nested_cli)", 6),
    ("KVM tests: vpsci (test nested_hibernate)", 2),
    ("KVM tests: vpsci (test nested_linux)", 1),
    ("KVM tests: vpsci (test nested_linux_console)", 1),
    ("KVM tests: vpsci (test nested_linux_disk)", 5),
    ("KVM tests: vpsci (test nested_linux_disk_snapshot)", 2),
    ("KVM tests: vpsci (test nested_linux_hibernate)", 2),
    ("KVM tests: vpsci (test nested_linux_hotplug)", 1),
    ("KVM tests: vpsci (test nested_linux_disk_migration)", 1),
    ("KVM tests: vpsci (test nested_linux_migration)", 1),
    ("KVM tests: vpsci (test nested_linux_reboot)", 1),
    ("KVM tests: vpsci (test nested_linux_snapshot)", 1),
    ("KVM tests: vpsci (test nested_linux_suspend)", 1),
    ("KVM tests: vpsci (test nested_measure)", 3),
    // Its one test is a measurement, ignored (reported skipped) in test runs.
    ("KVM tests: vpsci (test nested_measure_linux)", 1),
    // Thirteen tests (the golost work added a cut Go, a corrupted Go and a lost Running;
    // the apilive work info polled during a migration) and the measurement (ignored,
    // reported skipped).
    ("KVM tests: vpsci (test nested_migration)", 14),
    ("KVM tests: vpsci (test migration_wire)", 8),
    ("KVM tests: vpsci (test nested_reset)", 4),
    ("KVM tests: vpsci (test nested_routing)", 1),
    ("KVM tests: vpsci (test nested_rtc)", 2),
    ("KVM tests: vpsci (test nested_smp)", 7),
    ("KVM tests: vpsci (test nested_snapshot)", 7),
    ("KVM tests: vpsci (test snapshot_format)", 8),
    ("KVM tests: vpsci (test nested_suspend)", 5),
    ("KVM tests: vpsci (test pause)", 2),
    ("KVM tests: vpsci-harness-selftest (bin unit tests)", 1),
    ("KVM tests: vpsci-bench (bin unit tests)", 21),
];

/// The least number of tests `group` must report.
pub fn minimum_tests(group: &str) -> u64 {
    MINIMUM_TESTS
        .iter()
        .find(|(name, _)| *name == group)
        .map_or(1, |(_, minimum)| *minimum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_groups_get_their_minimum_and_others_need_one_test() {
        assert_eq!(minimum_tests("loom model checks (firmware)"), 8);
        assert_eq!(minimum_tests("KVM tests: vpsci (bin unit tests)"), 0);
        assert_eq!(minimum_tests("KVM tests: somebody (test new)"), 1);
    }

    #[test]
    fn every_group_is_listed_once() {
        for (i, (name, _)) in MINIMUM_TESTS.iter().enumerate() {
            assert!(
                MINIMUM_TESTS[i + 1..]
                    .iter()
                    .all(|(other, _)| other != name),
                "{name} is listed twice"
            );
        }
    }
}
