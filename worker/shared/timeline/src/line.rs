//! One line of a timeline file.

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::summary::Summary;
use crate::tick::Tick;

/// The version of the contract this crate writes and the newest it reads.
/// Lines without a version (amm 473be8f and earlier) read as this version.
pub const VERSION: u32 = 1;

/// One line: when, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// [`VERSION`] the line was written with (0: before the contract).
    #[serde(default)]
    pub v: u32,
    /// Milliseconds since the writing process (this attempt) started.
    #[serde(default)]
    pub t_ms: u64,
    /// CLOCK_MONOTONIC ns when it happened (for a kernel event relayed by
    /// amm-agent: when the kernel saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_ns: Option<u64>,
    /// What the line holds.
    #[serde(flatten)]
    pub entry: Entry,
}

/// What a line holds; `kind` on the line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A sample of the process.
    Tick(Box<Tick>),
    /// Something that happened.
    Event(Event),
    /// The run's summary, as the supervisor printed it when everything
    /// ended (the last line, when written at all).
    Summary(Box<Summary>),
    /// A kind this reader does not know (written by a newer amm): ignored.
    #[serde(other)]
    Other,
}

impl Line {
    /// A line of the current version.
    pub fn new(t_ms: u64, t_ns: Option<u64>, entry: Entry) -> Line {
        Line {
            v: VERSION,
            t_ms,
            t_ns,
            entry,
        }
    }

    /// The line as JSON text (no newline).
    pub fn to_json(&self) -> String {
        // every type here serialises: maps have string keys, floats come
        // from arithmetic on finite values; a NaN would become null
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"v\":{VERSION},\"t_ms\":{},\"kind\":\"event\",\"event\":\"unwritable\",\"error\":{:?}}}",
                self.t_ms,
                e.to_string()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Phase, Start};
    use crate::split::Split;

    #[test]
    fn lines_keep_amms_flat_shape() {
        let tick = Line::new(
            200,
            Some(7),
            Entry::Tick(Box::new(Tick {
                process: 100,
                split: Some(Split {
                    process: 100,
                    managed: 10,
                    unmanaged_live: 20,
                    hoarded: 30,
                    non_heap: 40,
                    ..Split::default()
                }),
                ..Tick::default()
            })),
        );
        let text = tick.to_json();
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["v"], 1);
        assert_eq!(v["kind"], "tick");
        assert_eq!(v["unmanaged_live"], 20);
        let back: Line = serde_json::from_str(&text).expect("back");
        assert_eq!(back, tick);

        let phase = Line::new(
            300,
            None,
            Entry::Event(Event::Phase(Phase {
                name: "fill".into(),
                ..Phase::default()
            })),
        );
        let text = phase.to_json();
        assert!(text.contains(r#""kind":"event""#), "{text}");
        assert!(text.contains(r#""event":"phase""#), "{text}");
        assert_eq!(serde_json::from_str::<Line>(&text).expect("back"), phase);
    }

    #[test]
    fn a_line_from_before_the_contract_reads_as_version_0() {
        let l: Line = serde_json::from_str(
            r#"{"t_ms":0,"kind":"event","event":"start","attempt":0,"allocator":"jemalloc","limit":1000}"#,
        )
        .expect("v0");
        assert_eq!(l.v, 0);
        let Entry::Event(Event::Start(s)) = l.entry else {
            panic!("{l:?}")
        };
        assert_eq!(s.limit, Some(1000));
        assert_eq!(
            *s,
            Start {
                limit: Some(1000),
                allocator: Some(crate::Allocator::Jemalloc),
                ..Start::default()
            }
        );
        let l: Line = serde_json::from_str(r#"{"v":1,"t_ms":5,"kind":"hologram"}"#).expect("other");
        assert_eq!(l.entry, Entry::Other);
    }
}
