//! amm-report: tells, for each stretch of a run, what explains a worker's
//! unmanaged memory — a leak, a hoard, fragmentation, task temporaries,
//! growth outside the heap, managed data — with the numbers that prove it,
//! or says "undecided" and what would decide it.
//!
//! It reads an `amm-worker --timeline` file ([`Run::from_timeline`]) or a
//! run recorded from kernel data alone by `amm-agent watch --report`
//! ([`Run::kernel`]), segments it ([`segment`]), classifies each stretch
//! ([`classify`], rules and reasons there and in [`Thresholds`]) and renders
//! a [`Report`] as text ([`render_text`]), JSON (`serde_json` on the
//! report; the shape is documented in [`report`]) or a self-contained HTML
//! page ([`render_html`]).
//!
//! What it must never do: link an allocator or touch a process. It only
//! reads data, so the privileged agent can link it (without jemalloc) as
//! safely as the worker.
//!
//! ```
//! let timeline = r#"{"t_ms":0,"kind":"tick","process":104857600,"managed":0,"unmanaged_live":0,"hoarded":0,"non_heap":104857600}"#;
//! let run = amm_report::Run::from_timeline(timeline.as_bytes())?;
//! let report = amm_report::analyze(&run, &amm_report::Thresholds::default());
//! assert_eq!(report.verdict.kind, amm_report::Kind::Steady);
//! # Ok::<(), amm_report::InputError>(())
//! ```

pub mod classify;
pub mod evidence;
pub mod fit;
pub mod from_agent;
pub mod input;
pub mod render_html;
pub mod render_svg;
pub mod render_text;
pub mod report;
pub mod segment;
pub mod thresholds;
pub mod units;

pub use amm_timeline::{Event, Levels, Split, Tick};
pub use classify::analyze;
pub use input::{At, InputError, Run, Source};
pub use report::{Kind, REPORT_VERSION, Report};
pub use thresholds::Thresholds;

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The terminal table.
    Text,
    /// The report as one JSON document.
    Json,
    /// A self-contained HTML page.
    Html,
}

impl Format {
    /// By a file's extension: `.html`/`.htm` HTML, `.json` JSON, else text.
    pub fn for_path(path: &std::path::Path) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("html" | "htm") => Format::Html,
            Some("json") => Format::Json,
            _ => Format::Text,
        }
    }
}

/// Renders `report` (made from `run`) in `format`.
pub fn render(run: &Run, report: &Report, format: Format) -> String {
    match format {
        Format::Text => render_text::render(report),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(report)
                .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise the report: {e}\"}}"));
            s.push('\n');
            s
        }
        Format::Html => render_html::render(run, report),
    }
}
