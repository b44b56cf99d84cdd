//! The power-state timeline: `vpsci timeline EVENTS.jsonl -o timeline.svg` reads an event
//! log (`docs/event-log.md`) and draws one lane per vCPU, coloured by power state, with a
//! tick for every PSCI call (red when it answered an error) and a line across all lanes for
//! every system event.
//!
//! The log says when each vCPU's state changed; before its first change a vCPU is drawn
//! in that change's `from` state, and a vCPU the log never mentions (but whose index is
//! below the highest one it does) as the boot state: vCPU 0 on, the others off. Lines of
//! kinds this reader does not draw are skipped, so newer logs still render. The SVG is
//! built with the `svg` crate.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde_json::Value;
use svg::node::element::{Group, Line, Rectangle, Text, Title};
use svg::Document;
use thiserror::Error;

/// Pixels of the time axis.
const PLOT_WIDTH: f64 = 1000.0;
/// Pixels left of the time axis (lane names).
const LEFT: f64 = 70.0;
/// Pixels above the first lane (system event labels).
const TOP: f64 = 30.0;
/// Height of one lane.
const LANE: f64 = 22.0;
/// Gap between lanes.
const GAP: f64 = 4.0;
/// Pixels below the last lane (axis and legend).
const BOTTOM: f64 = 70.0;

/// Why an event log could not be drawn.
#[derive(Debug, Error)]
pub enum TimelineError {
    /// The file could not be read.
    #[error("cannot read the event log: {0}")]
    Read(#[from] std::io::Error),
    /// A line is not an event this reader understands.
    #[error("event log line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No power-state change, call or system event at all.
    #[error("the event log has no events to draw")]
    Empty,
}

/// A vCPU power state as the event log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `off`.
    Off,
    /// `on_pending`.
    OnPending,
    /// `on`.
    On,
    /// `suspended_standby`.
    Standby,
    /// `suspended_powerdown`.
    Powerdown,
    /// `suspended_system`.
    System,
    /// `frozen`.
    Frozen,
}

impl State {
    const ALL: [State; 7] = [
        State::Off,
        State::OnPending,
        State::On,
        State::Standby,
        State::Powerdown,
        State::System,
        State::Frozen,
    ];

    fn parse(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The event log's name.
    pub const fn name(self) -> &'static str {
        match self {
            State::Off => "off",
            State::OnPending => "on_pending",
            State::On => "on",
            State::Standby => "suspended_standby",
            State::Powerdown => "suspended_powerdown",
            State::System => "suspended_system",
            State::Frozen => "frozen",
        }
    }

    const fn colour(self) -> &'static str {
        match self {
            State::Off => "#d9d9d9",
            State::OnPending => "#f2c14e",
            State::On => "#4a9c4a",
            State::Standby => "#7fb2e5",
            State::Powerdown => "#3b6fb6",
            State::System => "#6a4c9c",
            State::Frozen => "#b04a4a",
        }
    }
}

/// A stretch of time one vCPU spent in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Start, nanoseconds since VM start.
    pub start_ns: u64,
    /// End (exclusive).
    pub end_ns: u64,
    /// The state.
    pub state: State,
}

/// A PSCI call, drawn as a tick on its caller's lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// When it was logged.
    pub t_ns: u64,
    /// Calling vCPU.
    pub vcpu: u32,
    /// Function name.
    pub function: String,
    /// Whether it answered an error code.
    pub error: bool,
}

/// A system event, drawn across every lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemMark {
    /// When it was logged.
    pub t_ns: u64,
    /// Calling vCPU.
    pub vcpu: u32,
    /// `off`, `reset`, ... with ` (refused)` when the VMM refused it.
    pub label: String,
}

/// Everything the picture shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Timeline {
    /// Per vCPU (index order), its segments in time order, covering 0..`end_ns`.
    pub lanes: Vec<Vec<Segment>>,
    /// PSCI calls.
    pub calls: Vec<Call>,
    /// System events.
    pub system_events: Vec<SystemMark>,
    /// The last time in the log.
    pub end_ns: u64,
}

fn field<'a>(v: &'a Value, name: &str, line: usize) -> Result<&'a Value, TimelineError> {
    v.get(name).ok_or_else(|| TimelineError::Line {
        line,
        reason: format!("no \"{name}\""),
    })
}

fn number(v: &Value, name: &str, line: usize) -> Result<u64, TimelineError> {
    field(v, name, line)?
        .as_u64()
        .ok_or_else(|| TimelineError::Line {
            line,
            reason: format!("\"{name}\" is not a non-negative integer"),
        })
}

fn text<'a>(v: &'a Value, name: &str, line: usize) -> Result<&'a str, TimelineError> {
    field(v, name, line)?
        .as_str()
        .ok_or_else(|| TimelineError::Line {
            line,
            reason: format!("\"{name}\" is not a string"),
        })
}

fn state(v: &Value, name: &str, line: usize) -> Result<State, TimelineError> {
    let s = text(v, name, line)?;
    State::parse(s).ok_or_else(|| TimelineError::Line {
        line,
        reason: format!("unknown power state {s:?}"),
    })
}

fn vcpu(v: &Value, line: usize) -> Result<u32, TimelineError> {
    u32::try_from(number(v, "vcpu", line)?).map_err(|_| TimelineError::Line {
        line,
        reason: "\"vcpu\" is out of range".to_owned(),
    })
}

/// One vCPU's changes: (time, from, to).
type Changes = Vec<(u64, State, State)>;

/// Reads an event log. Blank lines are skipped; any other line must be a JSON event with
/// `t_ns` and `kind`.
pub fn parse(reader: impl BufRead) -> Result<Timeline, TimelineError> {
    let mut changes: BTreeMap<u32, Changes> = BTreeMap::new();
    let mut t = Timeline::default();
    let mut max_vcpu: Option<u32> = None;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| TimelineError::Line {
            line: n,
            reason: format!("not JSON: {e}"),
        })?;
        let t_ns = number(&v, "t_ns", n)?;
        let kind = text(&v, "kind", n)?;
        match kind {
            "power_state" => {
                let cpu = vcpu(&v, n)?;
                let change = (t_ns, state(&v, "from", n)?, state(&v, "to", n)?);
                changes.entry(cpu).or_default().push(change);
                max_vcpu = max_vcpu.max(Some(cpu));
            }
            "psci_call" => {
                let cpu = vcpu(&v, n)?;
                let result = field(&v, "result", n)?;
                let error = result
                    .get("x0")
                    .and_then(Value::as_i64)
                    .is_some_and(|x| x < 0);
                t.calls.push(Call {
                    t_ns,
                    vcpu: cpu,
                    function: text(&v, "function", n)?.to_owned(),
                    error,
                });
                max_vcpu = max_vcpu.max(Some(cpu));
            }
            "system_event" => {
                let cpu = vcpu(&v, n)?;
                let mut label = text(&v, "event", n)?.to_owned();
                if v.get("refused").and_then(Value::as_bool) == Some(true) {
                    label.push_str(" (refused)");
                }
                t.system_events.push(SystemMark {
                    t_ns,
                    vcpu: cpu,
                    label,
                });
                max_vcpu = max_vcpu.max(Some(cpu));
            }
            _ => {}
        }
        t.end_ns = t.end_ns.max(t_ns);
    }
    let Some(max_vcpu) = max_vcpu else {
        return Err(TimelineError::Empty);
    };
    for cpu in 0..=max_vcpu {
        let boot = if cpu == 0 { State::On } else { State::Off };
        let list = changes.remove(&cpu).unwrap_or_default();
        let mut current = list.first().map_or(boot, |&(_, from, _)| from);
        let mut since = 0;
        let mut lane = Vec::new();
        for (at, _, to) in list {
            if at > since {
                lane.push(Segment {
                    start_ns: since,
                    end_ns: at,
                    state: current,
                });
            }
            current = to;
            since = at;
        }
        lane.push(Segment {
            start_ns: since,
            end_ns: t.end_ns.max(since),
            state: current,
        });
        t.lanes.push(lane);
    }
    Ok(t)
}

/// A round axis step (1, 2 or 5 times a power of ten) giving about `ticks` ticks.
fn tick_step(span_ms: f64, ticks: f64) -> f64 {
    let raw = (span_ms / ticks).max(1e-6);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// Draws `t` as an SVG document.
pub fn render(t: &Timeline) -> Document {
    let end = t.end_ns.max(1) as f64;
    let x = |ns: u64| LEFT + ns as f64 / end * PLOT_WIDTH;
    let lane_y = |cpu: usize| TOP + cpu as f64 * (LANE + GAP);
    let lanes_bottom = lane_y(t.lanes.len());
    let height = lanes_bottom + BOTTOM;
    let width = LEFT + PLOT_WIDTH + 90.0;
    let mut doc = Document::new()
        .set("viewBox", (0, 0, width, height))
        .set("width", width)
        .set("height", height)
        .set("font-family", "sans-serif")
        .set("font-size", 11)
        .add(
            Rectangle::new()
                .set("width", width)
                .set("height", height)
                .set("fill", "white"),
        );

    for (cpu, lane) in t.lanes.iter().enumerate() {
        let y = lane_y(cpu);
        let mut group = Group::new().set("class", "lane").add(
            Text::new(format!("vcpu{cpu}"))
                .set("x", LEFT - 8.0)
                .set("y", y + LANE * 0.7)
                .set("text-anchor", "end"),
        );
        for seg in lane {
            let w = (x(seg.end_ns) - x(seg.start_ns)).max(0.5);
            group = group.add(
                Rectangle::new()
                    .set("class", seg.state.name())
                    .set("x", x(seg.start_ns))
                    .set("y", y)
                    .set("width", w)
                    .set("height", LANE)
                    .set("fill", seg.state.colour())
                    .add(Title::new(format!(
                        "vcpu{cpu} {} from {:.3} ms to {:.3} ms",
                        seg.state.name(),
                        seg.start_ns as f64 / 1e6,
                        seg.end_ns as f64 / 1e6
                    ))),
            );
        }
        doc = doc.add(group);
    }

    let mut calls = Group::new().set("class", "calls");
    for call in &t.calls {
        let y = lane_y(call.vcpu as usize);
        calls = calls.add(
            Line::new()
                .set("x1", x(call.t_ns))
                .set("x2", x(call.t_ns))
                .set("y1", y + LANE * 0.55)
                .set("y2", y + LANE)
                .set("stroke", if call.error { "#c0392b" } else { "#333333" })
                .set("stroke-width", 1)
                .add(Title::new(format!(
                    "{} by vcpu{} at {:.3} ms{}",
                    call.function,
                    call.vcpu,
                    call.t_ns as f64 / 1e6,
                    if call.error { " (error)" } else { "" }
                ))),
        );
    }
    doc = doc.add(calls);

    for mark in &t.system_events {
        doc = doc
            .add(
                Line::new()
                    .set("class", "system-event")
                    .set("x1", x(mark.t_ns))
                    .set("x2", x(mark.t_ns))
                    .set("y1", TOP - 6.0)
                    .set("y2", lanes_bottom)
                    .set("stroke", "#c0392b")
                    .set("stroke-width", 2),
            )
            .add(
                Text::new(format!("{} (vcpu{})", mark.label, mark.vcpu))
                    .set("x", x(mark.t_ns) + 3.0)
                    .set("y", TOP - 10.0)
                    .set("fill", "#c0392b"),
            );
    }

    // Time axis in milliseconds.
    let span_ms = end / 1e6;
    let step = tick_step(span_ms, 10.0);
    let mut axis = Group::new().set("class", "axis").add(
        Line::new()
            .set("x1", LEFT)
            .set("x2", LEFT + PLOT_WIDTH)
            .set("y1", lanes_bottom + 2.0)
            .set("y2", lanes_bottom + 2.0)
            .set("stroke", "#333333"),
    );
    let mut tick = 0.0;
    while tick <= span_ms + step * 1e-9 {
        let px = LEFT + tick / span_ms.max(1e-9) * PLOT_WIDTH;
        axis = axis
            .add(
                Line::new()
                    .set("x1", px)
                    .set("x2", px)
                    .set("y1", lanes_bottom + 2.0)
                    .set("y2", lanes_bottom + 6.0)
                    .set("stroke", "#333333"),
            )
            .add(
                Text::new(format!("{tick}"))
                    .set("x", px)
                    .set("y", lanes_bottom + 18.0)
                    .set("text-anchor", "middle"),
            );
        tick += step;
    }
    axis = axis.add(
        Text::new("ms since VM start")
            .set("x", LEFT + PLOT_WIDTH)
            .set("y", lanes_bottom + 32.0)
            .set("text-anchor", "end"),
    );
    doc = doc.add(axis);

    let mut legend = Group::new().set("class", "legend");
    for (i, s) in State::ALL.into_iter().enumerate() {
        let lx = LEFT + i as f64 * 150.0;
        let ly = lanes_bottom + 44.0;
        legend = legend
            .add(
                Rectangle::new()
                    .set("x", lx)
                    .set("y", ly)
                    .set("width", 12)
                    .set("height", 12)
                    .set("fill", s.colour()),
            )
            .add(Text::new(s.name()).set("x", lx + 16.0).set("y", ly + 10.0));
    }
    doc.add(legend)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"t_ns":100000,"kind":"psci_call","vcpu":0,"function":"CPU_ON","function_id":"0xc4000003","args":["0x1","0x40080000","0x0"],"result":{"outcome":"return","x0":0}}
{"t_ns":100000,"kind":"power_state","vcpu":1,"from":"off","to":"on_pending"}
{"t_ns":300000,"kind":"power_state","vcpu":1,"from":"on_pending","to":"on"}

{"t_ns":400000,"kind":"wakeup","vcpu":1,"sources":[]}
{"t_ns":500000,"kind":"psci_call","vcpu":1,"function":"SYSTEM_SUSPEND","function_id":"0xc400000e","args":["0x0","0x0","0x0"],"result":{"outcome":"return","x0":-3}}
{"t_ns":900000,"kind":"system_event","vcpu":0,"event":"hibernate","refused":true}
{"t_ns":1000000,"kind":"system_event","vcpu":0,"event":"off"}
"#;

    #[test]
    fn lanes_follow_the_logged_transitions_and_cover_the_whole_run() {
        let t = parse(LOG.as_bytes()).expect("valid log");
        assert_eq!(t.end_ns, 1_000_000);
        assert_eq!(t.lanes.len(), 2, "vCPUs 0 and 1");
        assert_eq!(
            t.lanes[0],
            vec![Segment {
                start_ns: 0,
                end_ns: 1_000_000,
                state: State::On
            }]
        );
        assert_eq!(
            t.lanes[1],
            vec![
                Segment {
                    start_ns: 0,
                    end_ns: 100_000,
                    state: State::Off
                },
                Segment {
                    start_ns: 100_000,
                    end_ns: 300_000,
                    state: State::OnPending
                },
                Segment {
                    start_ns: 300_000,
                    end_ns: 1_000_000,
                    state: State::On
                },
            ]
        );
        assert_eq!(t.calls.len(), 2);
        assert!(!t.calls[0].error && t.calls[1].error);
        assert_eq!(t.system_events[0].label, "hibernate (refused)");
        assert_eq!(t.system_events[1].label, "off");
    }

    #[test]
    fn the_picture_has_a_lane_per_vcpu_a_tick_per_call_and_a_line_per_system_event() {
        let svg = render(&parse(LOG.as_bytes()).expect("valid log")).to_string();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert_eq!(svg.matches("class=\"lane\"").count(), 2);
        assert_eq!(svg.matches("class=\"on_pending\"").count(), 1);
        assert_eq!(svg.matches("class=\"system-event\"").count(), 2);
        assert!(svg.contains("SYSTEM_SUSPEND by vcpu1 at 0.500 ms (error)"));
        assert!(svg.contains("hibernate (refused) (vcpu0)"));
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let log = "{\"t_ns\":1,\"kind\":\"power_state\",\"vcpu\":0,\"from\":\"on\",\"to\":\"off\"}\nnot json\n";
        match parse(log.as_bytes()) {
            Err(TimelineError::Line { line, reason }) => {
                assert_eq!(line, 2);
                assert!(reason.starts_with("not JSON"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let log =
            "{\"t_ns\":1,\"kind\":\"power_state\",\"vcpu\":0,\"from\":\"on\",\"to\":\"dozing\"}\n";
        assert!(matches!(
            parse(log.as_bytes()),
            Err(TimelineError::Line { line: 1, reason }) if reason.contains("dozing")
        ));
        assert!(matches!(
            parse("{\"kind\":\"psci_call\"}".as_bytes()),
            Err(TimelineError::Line { line: 1, reason }) if reason.contains("t_ns")
        ));
    }

    #[test]
    fn a_log_without_events_to_draw_is_refused() {
        assert!(matches!(parse("\n".as_bytes()), Err(TimelineError::Empty)));
    }

    #[test]
    fn axis_steps_are_round_numbers() {
        assert_eq!(tick_step(1000.0, 10.0), 100.0);
        assert_eq!(tick_step(3356.0, 10.0), 500.0);
        assert_eq!(tick_step(0.8, 10.0), 0.1);
    }
}
