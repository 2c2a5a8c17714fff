//! The terminal report: the verdict on the first lines, a table of the
//! stretches, then the evidence of each stretch that is not steady.

use std::fmt::Write;

use crate::classify::place;
use crate::input::Source;
use crate::report::{Finding, Kind, Report, Stretch};
use crate::units::{bytes, rate, signed};

/// Renders the report as plain text (no colours, 100 columns).
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = write_report(&mut o, r);
    o
}

fn write_report(o: &mut String, r: &Report) -> std::fmt::Result {
    write_verdict(o, r)?;
    write_sources(o, r)?;
    write_stretches(o, r)?;
    write_evidence(o, r)
}

/// The verdict, first, and what would decide it.
fn write_verdict(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(o, "VERDICT: {}", r.verdict.kind.name().to_uppercase())?;
    writeln!(o, "  {}", r.verdict.headline)?;
    for a in &r.verdict.also {
        writeln!(o, "  also {a}")?;
    }
    if let Some(f) = r
        .verdict
        .stretch
        .and_then(|i| r.stretches.get(i))
        .and_then(|s| s.findings.first())
        && let Some(d) = &f.would_decide
    {
        writeln!(o, "  what would decide it: {d}")?;
    }
    writeln!(o)
}

/// What was looked at: the source, the allocator, the run, the purges.
fn write_sources(o: &mut String, r: &Report) -> std::fmt::Result {
    let src = match r.source {
        Source::WorkerTimeline => "amm-worker timeline",
        Source::Kernel => "kernel only (amm-agent watch)",
        Source::AgentTimeline => "a running worker, through amm-agent",
    };
    let alloc = match (&r.allocator.name, r.allocator.available) {
        (Some(n), true) => format!("{n} statistics"),
        (Some(n), false) => format!("{n}, statistics unavailable"),
        (None, _) => "allocator statistics unavailable".into(),
    };
    write!(
        o,
        "{src}; {alloc}; {:.1} s, {} samples",
        r.run.duration_s, r.run.ticks
    )?;
    if r.run.attempts > 1 {
        write!(o, ", {} processes (restarts)", r.run.attempts)?;
    }
    write!(o, "; peak RSS {}", bytes(r.run.peak_process_bytes))?;
    if let Some(l) = r.run.limit_bytes {
        write!(o, " of limit {}", bytes(l))?;
    }
    writeln!(o)?;
    if !r.run.levels_reached.is_empty() {
        let hits: Vec<String> = r
            .run
            .levels_reached
            .iter()
            .map(|h| format!("{} at {:.1} s", h.level, h.t_s))
            .collect();
        writeln!(o, "levels reached: {}", hits.join(", "))?;
    }
    let probe = &r.run.probe_purge;
    let purges = r.purges.len();
    if r.source == Source::WorkerTimeline {
        if probe.enabled {
            writeln!(
                o,
                "purges: {purges}, of which {} run on purpose to decide (--probe-purge every {} ms){}",
                probe.count,
                probe.interval_ms.unwrap_or(0),
                probe_times(r)
            )?;
        } else {
            writeln!(o, "purges: {purges} (--probe-purge off)")?;
        }
    }
    if let Some(n) = &r.allocator.note {
        writeln!(o, "allocator: {n}")?;
    }
    for n in &r.run.notes {
        writeln!(o, "note: {n}")?;
    }
    writeln!(o)
}

/// The table of stretches: with the accounting split when the run has it,
/// else the RSS at each end.
fn write_stretches(o: &mut String, r: &Report) -> std::fmt::Result {
    let split = r
        .stretches
        .iter()
        .any(|s| s.memory.unmanaged_live.is_some());
    if split {
        writeln!(
            o,
            "{:>3}  {:<13} {:<22} {:<15} {:>10} {:>10} {:>10} {:>10}",
            "#", "time (s)", "phases", "verdict", "RSS", "managed", "unmgd live", "hoarded"
        )?;
    } else {
        writeln!(
            o,
            "{:>3}  {:<13} {:<15} {:>10} {:>10}",
            "#", "time (s)", "verdict", "RSS first", "RSS last"
        )?;
    }
    for s in &r.stretches {
        let time = format!("{:.1}-{:.1}", s.from_s, s.to_s);
        if split {
            let last = |x: &Option<crate::report::Range>| x.map_or("-".into(), |v| bytes(v.last));
            writeln!(
                o,
                "{:>3}  {:<13} {:<22} {:<15} {:>10} {:>10} {:>10} {:>10}",
                s.index,
                time,
                clip(&phases(s), 22),
                s.verdict.name(),
                bytes(s.memory.process.last),
                last(&s.memory.managed),
                last(&s.memory.unmanaged_live),
                last(&s.memory.hoarded)
            )?;
        } else {
            writeln!(
                o,
                "{:>3}  {:<13} {:<15} {:>10} {:>10}",
                s.index,
                time,
                s.verdict.name(),
                bytes(s.memory.process.first),
                bytes(s.memory.process.last)
            )?;
        }
    }
    Ok(())
}

/// The evidence of every stretch that is not steady.
fn write_evidence(o: &mut String, r: &Report) -> std::fmt::Result {
    let notable: Vec<&Stretch> = r
        .stretches
        .iter()
        .filter(|s| s.verdict != Kind::Steady)
        .collect();
    if !notable.is_empty() {
        writeln!(o)?;
        writeln!(o, "EVIDENCE")?;
    }
    for s in notable {
        writeln!(o, "[{}] {} — {}", s.index, s.verdict.name(), place(s))?;
        for (k, f) in s.findings.iter().enumerate() {
            write_finding(o, f, k == 0)?;
        }
    }
    Ok(())
}

fn write_finding(o: &mut String, f: &Finding, lead: bool) -> std::fmt::Result {
    let mark = if lead { "*" } else { "-" };
    writeln!(o, "  {mark} {}: {}", f.kind.name(), f.headline)?;
    if let Some(t) = &f.trend {
        writeln!(
            o,
            "      trend of {}: {} over {:.1}-{:.1} s = {}, R² {:.3}, Mann–Kendall tau {:.2} p {:.4} ({} floor bins)",
            t.series,
            rate(t.slope_bytes_per_s),
            t.from_s,
            t.to_s,
            signed(t.growth_bytes),
            t.r2,
            t.mann_kendall.tau,
            t.mann_kendall.p_increasing,
            t.floor.len()
        )?;
    }
    for p in f.purges.iter().take(6) {
        writeln!(
            o,
            "      purge at {:.2} s ({}): returned {}, hoarded {} -> {}",
            p.t_s,
            p.reason,
            bytes(p.returned_bytes),
            bytes(p.hoarded_before),
            bytes(p.hoarded_after)
        )?;
    }
    if f.purges.len() > 6 {
        writeln!(o, "      ... {} more purges", f.purges.len() - 6)?;
    }
    for c in f.size_classes.iter().take(5) {
        writeln!(o, "      {}", c.describe())?;
    }
    for a in f.arenas.iter().take(5) {
        if a.system_bytes > 0 {
            writeln!(
                o,
                "      arena {}: {} in free chunks, {} from the system{}",
                a.arena,
                bytes(a.free_bytes),
                bytes(a.system_bytes),
                a.delta_bytes.map_or_else(String::new, |d| format!(
                    " ({} over the stretch)",
                    signed(d)
                ))
            )?;
        } else {
            writeln!(
                o,
                "      arena {}: {} dirty/muzzy",
                a.arena,
                bytes(a.free_bytes)
            )?;
        }
    }
    for n in &f.notes {
        writeln!(o, "      {n}")?;
    }
    if let Some(d) = &f.would_decide {
        writeln!(o, "      would decide it: {d}")?;
    }
    Ok(())
}

fn probe_times(r: &Report) -> String {
    let t: Vec<String> = r
        .purges
        .iter()
        .filter(|p| p.probe)
        .take(8)
        .map(|p| format!("{:.1}", p.t_s))
        .collect();
    if t.is_empty() {
        String::new()
    } else {
        format!(
            "; probes at {} s{}",
            t.join(", "),
            if r.run.probe_purge.count > 8 {
                ", ..."
            } else {
                ""
            }
        )
    }
}

fn phases(s: &Stretch) -> String {
    let mut names: Vec<&str> = Vec::new();
    for p in &s.phases {
        if !names.contains(&p.as_str()) {
            names.push(p);
        }
    }
    if names.is_empty() {
        "-".into()
    } else {
        names.join("+")
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('…');
        c
    }
}
