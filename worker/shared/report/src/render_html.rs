//! The HTML report: one self-contained page (no script, nothing loaded:
//! the chart is inline SVG from [`crate::render_svg`]) with the verdict, a
//! stacked area chart of the run's memory, then the tables and evidence.

use std::fmt::Write;

use crate::classify::place;
use crate::input::{Run, Source};
use crate::render_svg::{chart, colour, esc};
use crate::report::{Finding, Report};
use crate::units::{bytes, rate};

/// Renders the page.
pub fn render(run: &Run, r: &Report) -> String {
    let mut o = String::new();
    let _ = page(&mut o, run, r);
    o
}

fn page(o: &mut String, run: &Run, r: &Report) -> std::fmt::Result {
    head(o, r)?;
    verdict(o, r)?;
    run_line(o, r)?;
    writeln!(o, "{}", chart(run, r))?;
    stretch_table(o, r)?;
    evidence(o, r)?;
    purges_and_rules(o, r)
}

/// The document head and its style.
fn head(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(
        o,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    )?;
    writeln!(
        o,
        "<title>amm report: {}</title>",
        esc(r.verdict.kind.name())
    )?;
    writeln!(
        o,
        "<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}}\
         h1{{font-size:1.5em;margin-bottom:.2em}} .v{{display:inline-block;padding:.1em .5em;border-radius:.3em;color:#fff}}\
         table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ddd;padding:.2em .5em;text-align:left;font-size:.9em}}\
         th{{background:#f4f4f4}} td.n{{text-align:right;font-variant-numeric:tabular-nums}}\
         .f{{margin:.3em 0 .8em 1em}} .muted{{color:#666}} ul{{margin:.2em 0}}</style>"
    )?;
    writeln!(o, "</head><body>")?;
    Ok(())
}

/// The verdict, what would decide it, and what else was found.
fn verdict(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(
        o,
        "<h1>amm report: <span class=\"v\" style=\"background:{}\">{}</span></h1>",
        colour(r.verdict.kind),
        esc(&r.verdict.kind.name().to_uppercase())
    )?;
    writeln!(o, "<p><b>{}</b></p>", esc(&r.verdict.headline))?;
    if let Some(d) = r
        .verdict
        .stretch
        .and_then(|i| r.stretches.get(i))
        .and_then(|s| s.findings.first())
        .and_then(|f| f.would_decide.as_ref())
    {
        writeln!(o, "<p>What would decide it: {}</p>", esc(d))?;
    }
    if !r.verdict.also.is_empty() {
        writeln!(o, "<p>Also:</p><ul>")?;
        for a in &r.verdict.also {
            writeln!(o, "<li>{}</li>", esc(a))?;
        }
        writeln!(o, "</ul>")?;
    }
    Ok(())
}

/// What the run was: source, allocator, length, peak, limit, purges, notes.
fn run_line(o: &mut String, r: &Report) -> std::fmt::Result {
    let src = match r.source {
        Source::WorkerTimeline => "amm-worker timeline",
        Source::Kernel => "kernel data only (amm-agent watch)",
        Source::AgentTimeline => "a running worker, through amm-agent",
    };
    write!(
        o,
        "<p class=\"muted\">{src}; allocator: {}; {:.1} s, {} samples, peak RSS {}",
        esc(&match (&r.allocator.name, r.allocator.available) {
            (Some(n), true) => format!("{n} (statistics read every tick)"),
            (Some(n), false) => format!("{n}, statistics unavailable"),
            (None, _) => "statistics unavailable".into(),
        }),
        r.run.duration_s,
        r.run.ticks,
        bytes(r.run.peak_process_bytes)
    )?;
    if let Some(l) = r.run.limit_bytes {
        write!(o, ", limit {}", bytes(l))?;
    }
    let p = &r.run.probe_purge;
    if r.source == Source::WorkerTimeline {
        if p.enabled {
            write!(
                o,
                "; {} purges, {} of them on purpose (--probe-purge every {} ms, red lines)",
                r.purges.len(),
                p.count,
                p.interval_ms.unwrap_or(0)
            )?;
        } else {
            write!(o, "; {} purges (--probe-purge off)", r.purges.len())?;
        }
    }
    writeln!(o, ".</p>")?;
    if let Some(n) = &r.allocator.note {
        writeln!(o, "<p><b>Allocator part unavailable:</b> {}</p>", esc(n))?;
    }
    for n in &r.run.notes {
        writeln!(o, "<p class=\"muted\">Note: {}</p>", esc(n))?;
    }
    Ok(())
}

/// One row per stretch.
fn stretch_table(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(
        o,
        "<h2>Stretches</h2><table><tr><th>#</th><th>time (s)</th><th>phases</th><th>verdict</th><th>RSS</th><th>managed</th><th>unmanaged live</th><th>hoarded</th><th>non-heap</th><th>headline</th></tr>"
    )?;
    for s in &r.stretches {
        let last = |x: &Option<crate::report::Range>| x.map_or("-".into(), |v| bytes(v.last));
        writeln!(
            o,
            "<tr><td>{}</td><td>{:.1}–{:.1}</td><td>{}</td><td><span class=\"v\" style=\"background:{}\">{}</span></td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            s.index,
            s.from_s,
            s.to_s,
            esc(&s.phases.join("+")),
            colour(s.verdict),
            s.verdict.name(),
            bytes(s.memory.process.last),
            last(&s.memory.managed),
            last(&s.memory.unmanaged_live),
            last(&s.memory.hoarded),
            last(&s.memory.non_heap),
            esc(&s.headline)
        )?;
    }
    writeln!(o, "</table>")?;
    Ok(())
}

/// Each stretch's findings with their evidence.
fn evidence(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(o, "<h2>Evidence</h2>")?;
    for s in r.stretches.iter().filter(|s| !s.findings.is_empty()) {
        writeln!(
            o,
            "<h3>[{}] {} — {}</h3>",
            s.index,
            esc(s.verdict.name()),
            esc(&place(s))
        )?;
        for f in &s.findings {
            finding(o, f)?;
        }
    }
    Ok(())
}

/// The purges, then the thresholds the verdicts came from.
fn purges_and_rules(o: &mut String, r: &Report) -> std::fmt::Result {
    if !r.purges.is_empty() {
        writeln!(
            o,
            "<h2>Purges</h2><table><tr><th>t (s)</th><th>reason</th><th>returned</th><th>hoarded before</th><th>hoarded after</th><th>took</th><th>stretch</th></tr>"
        )?;
        for p in &r.purges {
            writeln!(
                o,
                "<tr><td class=\"n\">{:.2}</td><td>{}{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.1} ms</td><td>{}</td></tr>",
                p.t_s,
                esc(&p.reason),
                if p.probe { " (on purpose)" } else { "" },
                bytes(p.returned_bytes),
                bytes(p.hoarded_before),
                bytes(p.hoarded_after),
                p.duration_us as f64 / 1000.0,
                p.stretch.map_or("-".into(), |s| s.to_string())
            )?;
        }
        writeln!(o, "</table>")?;
    }
    writeln!(
        o,
        "<h2>Rules</h2><p class=\"muted\">Thresholds (bytes, fractions, seconds; reasons in amm-report's \
         <code>thresholds</code> module): <code>{}</code></p>",
        esc(&serde_json::to_string(&r.thresholds).unwrap_or_default())
    )?;
    writeln!(o, "</body></html>")
}

fn finding(o: &mut String, f: &Finding) -> std::fmt::Result {
    writeln!(
        o,
        "<div class=\"f\"><p><span class=\"v\" style=\"background:{}\">{}</span> {}</p><ul>",
        colour(f.kind),
        esc(f.kind.name()),
        esc(&f.headline)
    )?;
    if let Some(t) = &f.trend {
        writeln!(
            o,
            "<li>trend of {}: {} over {:.1}–{:.1} s = {}{}, R² {:.3}, Mann–Kendall tau {:.2}, p {:.4} ({} floor bins)</li>",
            esc(&t.series),
            rate(t.slope_bytes_per_s),
            t.from_s,
            t.to_s,
            if t.growth_bytes < 0 { "-" } else { "+" },
            bytes(t.growth_bytes.unsigned_abs()),
            t.r2,
            t.mann_kendall.tau,
            t.mann_kendall.p_increasing,
            t.floor.len()
        )?;
    }
    for p in &f.purges {
        writeln!(
            o,
            "<li>purge at {:.2} s ({}): returned {}, hoarded {} → {}</li>",
            p.t_s,
            esc(&p.reason),
            bytes(p.returned_bytes),
            bytes(p.hoarded_before),
            bytes(p.hoarded_after)
        )?;
    }
    for c in &f.size_classes {
        writeln!(o, "<li>{}</li>", esc(&c.describe()))?;
    }
    for a in &f.arenas {
        writeln!(
            o,
            "<li>arena {}: {} free{}</li>",
            a.arena,
            bytes(a.free_bytes),
            if a.system_bytes > 0 {
                format!(" of {} from the system", bytes(a.system_bytes))
            } else {
                String::new()
            }
        )?;
    }
    for n in &f.notes {
        writeln!(o, "<li>{}</li>", esc(n))?;
    }
    if let Some(d) = &f.would_decide {
        writeln!(o, "<li><b>would decide it:</b> {}</li>", esc(d))?;
    }
    writeln!(o, "</ul></div>")
}

#[cfg(test)]
mod tests {
    use super::*;

    use amm_timeline::{Heap, JemallocStats, Split, Tick};

    #[test]
    fn the_page_is_self_contained() {
        let text = r#"{"t_ms":0,"kind":"tick","process":104857600,"managed":0,"unmanaged_live":0,"hoarded":0,"non_heap":104857600}
{"t_ms":200,"kind":"tick","process":104857600,"managed":0,"unmanaged_live":0,"hoarded":0,"non_heap":104857600}"#;
        let run = Run::from_timeline(text.as_bytes()).expect("run");
        let report = crate::analyze(&run, &crate::Thresholds::default());
        let page = render(&run, &report);
        assert!(page.contains("<svg id=\"amm-chart\""), "no chart");
        for tag in ["<script", "<link ", "src=", "href=\"http"] {
            assert!(
                !page.contains(tag),
                "the page must not load or run anything ({tag})"
            );
        }
    }

    /// Issue 10 §5: the page was 4.7 MB per run (plotly inlined); a
    /// 10-minute run at 200 ms ticks must stay under 1 MB.
    #[test]
    fn a_ten_minute_run_is_under_a_megabyte() {
        const MIB: u64 = 1 << 20;
        let mut run = Run::new(Source::WorkerTimeline, Some(4 << 30), Default::default());
        for i in 0..3000u64 {
            let u = 100 * MIB + (i % 37) * 3 * MIB + i * 50_000;
            let split = Split {
                process: u + 300 * MIB,
                managed: 200 * MIB,
                unmanaged_live: u,
                hoarded: 50 * MIB,
                non_heap: 50 * MIB,
                ..Split::default()
            };
            run.push_tick(
                i as f64 * 0.2,
                Tick {
                    process: split.process,
                    split: Some(split),
                    heap: Some(Heap::Jemalloc(JemallocStats {
                        allocated: 300 * MIB + u,
                        active: 310 * MIB + u,
                        resident: 350 * MIB + u,
                        dirty_bytes: 40 * MIB,
                        ..JemallocStats::default()
                    })),
                    ..Tick::default()
                },
            );
        }
        let report = crate::analyze(&run, &crate::Thresholds::default());
        let page = render(&run, &report);
        assert!(page.len() < 1_000_000, "{} bytes", page.len());
        assert!(page.contains("<path d=\"M"), "no series drawn");
    }
}
