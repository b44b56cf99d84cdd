//! The JSON-lines event log file, written from several threads at once.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use vpsci::events::{
    open, CallResult, Event, EventSink, Hex, JsonLinesFile, PowerState, SystemEvent,
};

#[test]
fn concurrent_writers_produce_whole_parseable_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = Arc::new(JsonLinesFile::create(&path, Instant::now()).unwrap());
    let threads: Vec<_> = (0..8u32)
        .map(|vcpu| {
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    sink.record(&Event::PsciCall {
                        vcpu,
                        function: "AFFINITY_INFO",
                        function_id: Hex(0xC400_0004),
                        args: [Hex(i), Hex(0), Hex(0)],
                        result: CallResult::Return { x0: 1 },
                    });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(sink.failures(), 0);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8 * 500);
    for vcpu in 0..8u64 {
        // Each thread's own events appear in its order, with rising times.
        let mine: Vec<&Value> = lines.iter().filter(|l| l["vcpu"] == vcpu).collect();
        assert_eq!(mine.len(), 500);
        for (i, l) in mine.iter().enumerate() {
            assert_eq!(l["args"][0], format!("{i:#x}"));
        }
        assert!(mine
            .windows(2)
            .all(|w| w[0]["t_ns"].as_u64() <= w[1]["t_ns"].as_u64()));
    }
}

#[test]
fn open_without_a_path_gives_a_disabled_sink() {
    let sink = open(None, Instant::now()).unwrap();
    assert!(!sink.enabled());
}

#[test]
fn open_with_a_path_writes_each_kind_of_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ev.jsonl");
    let sink = open(Some(&path), Instant::now()).unwrap();
    assert!(sink.enabled());
    sink.record(&Event::PowerState {
        vcpu: 1,
        from: PowerState::Off,
        to: PowerState::OnPending,
    });
    sink.record(&Event::SystemEvent {
        vcpu: 0,
        event: SystemEvent::Off,
        refused: false,
    });
    let kinds: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(kinds, ["\"power_state\"", "\"system_event\""]);
}

#[test]
fn unwritable_path_is_a_typed_error() {
    let err = open(Some("/nonexistent-dir/ev.jsonl".as_ref()), Instant::now())
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("/nonexistent-dir/ev.jsonl"));
}

/// Every function name the event log can carry (the engine's table, plus the unknown
/// marker) is documented in docs/event-log.md, spelled exactly as logged.
#[test]
fn every_logged_function_name_is_listed_in_the_event_log_docs() {
    let docs = include_str!("../../../docs/event-log.md");
    let start = docs
        .find("Every name that can appear")
        .expect("docs/event-log.md lists the function names");
    let list = &docs[start..];
    let list = &list[..list.find("\n\n").unwrap_or(list.len())];
    let documented: std::collections::BTreeSet<&str> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    let mut logged: std::collections::BTreeSet<&str> = vpsci_firmware::FunctionId::ALL
        .iter()
        .map(|f| f.name())
        .collect();
    logged.insert(vpsci::events::UNKNOWN_FUNCTION);
    assert_eq!(documented, logged);
}
