//! The HTML report: one self-contained page (plotly.js is inlined, so it
//! works offline) with the verdict, a stacked area chart of the run's memory
//! (managed, unmanaged_live, hoarded, non_heap, and spilled on top; RSS as a
//! line; levels as dashed lines; purges as dotted lines, probe purges in
//! red; each stretch shaded by its verdict), then the tables and evidence.

use std::fmt::Write;

use plotly::common::{DashType, Fill, Line, Mode};
use plotly::layout::{Annotation, Axis, Layout, Legend, Shape, ShapeLayer, ShapeLine, ShapeType};
use plotly::{Plot, Scatter};

use crate::classify::place;
use amm_timeline::{Event, Split};

use crate::input::{Run, Source};
use crate::report::{Finding, Kind, Report};
use crate::units::{bytes, rate};

const MIB: f64 = (1u64 << 20) as f64;

/// The colour a verdict is shaded with.
fn colour(k: Kind) -> &'static str {
    match k {
        Kind::Leak => "#d62728",
        Kind::NonHeapGrowth => "#8c564b",
        Kind::Undecided => "#bcbd22",
        Kind::Fragmentation => "#9467bd",
        Kind::Hoard => "#ff7f0e",
        Kind::Transient => "#17becf",
        Kind::ManagedGrowth => "#2ca02c",
        Kind::Steady => "#cccccc",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// plotly.js only (the crate's offline sources also carry MathJax, which
/// this page does not need); all of them if their shape ever changes.
fn plotly_js() -> String {
    let all = Plot::offline_js_sources();
    match all.find("</script>") {
        Some(end) if all[..end].contains("Plotly") => {
            format!("{}</script>", &all[..end])
        }
        _ => all,
    }
}

/// Renders the page.
pub fn render(run: &Run, r: &Report) -> String {
    let mut o = String::new();
    let _ = page(&mut o, run, r);
    o
}

fn page(o: &mut String, run: &Run, r: &Report) -> std::fmt::Result {
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
    writeln!(o, "{}", plotly_js())?;
    writeln!(o, "</head><body>")?;
    // the verdict
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
    // the run
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
    // the chart
    writeln!(o, "{}", chart(run, r).to_inline_html(Some("amm-chart")))?;
    // the stretches
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
    // the evidence
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
    // the purges
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

fn chart(run: &Run, r: &Report) -> Plot {
    let mut plot = Plot::new();
    let t: Vec<f64> = run.ticks.iter().map(|k| k.t).collect();
    let mib = |v: u64| v as f64 / MIB;
    let area = |name: &str, y: Vec<f64>, colour: &str| {
        Scatter::new(t.clone(), y)
            .name(name)
            .mode(Mode::Lines)
            .stack_group("memory")
            .fill(Fill::ToNextY)
            .line(Line::new().width(0.5).color(colour.to_string()))
            .fill_color(colour.to_string())
            .hover_template(format!(
                "{name}: %{{y:.1f}} MiB at %{{x:.2f}} s<extra></extra>"
            ))
    };
    let has_split = run.ticks.iter().any(|k| k.split.is_some());
    if has_split {
        let part = |f: fn(&Split) -> u64| -> Vec<f64> {
            run.ticks
                .iter()
                .map(|k| k.split.as_ref().map_or(0.0, |s| mib(f(s))))
                .collect()
        };
        plot.add_trace(area("managed", part(|s| s.managed), "#2ca02c"));
        plot.add_trace(area(
            "unmanaged_live",
            part(|s| s.unmanaged_live),
            "#d62728",
        ));
        plot.add_trace(area("hoarded", part(|s| s.hoarded), "#ff7f0e"));
        plot.add_trace(area("non_heap", part(|s| s.non_heap), "#7f7f7f"));
        plot.add_trace(area(
            "spilled (on disk, above RSS)",
            part(|s| s.spilled),
            "#aec7e8",
        ));
    } else {
        let anon: Vec<f64> = run
            .ticks
            .iter()
            .map(|k| mib(k.rss_anon.unwrap_or(k.process)))
            .collect();
        let file: Vec<f64> = run
            .ticks
            .iter()
            .map(|k| mib(k.rss_file_shmem.unwrap_or(0)))
            .collect();
        plot.add_trace(area("anonymous RSS", anon, "#9467bd"));
        plot.add_trace(area("file + shared RSS", file, "#7f7f7f"));
    }
    plot.add_trace(
        Scatter::new(
            t.clone(),
            run.ticks.iter().map(|k| mib(k.process)).collect(),
        )
        .name("process (RSS)")
        .mode(Mode::Lines)
        .line(Line::new().width(1.5).color("#000000".to_string()))
        .hover_template("RSS: %{y:.1f} MiB at %{x:.2f} s<extra></extra>"),
    );
    let mut shapes = Vec::new();
    let mut notes = Vec::new();
    // stretches, shaded by verdict
    for s in &r.stretches {
        shapes.push(
            Shape::new()
                .shape_type(ShapeType::Rect)
                .layer(ShapeLayer::Below)
                .x_ref("x")
                .y_ref("paper")
                .x0(s.from_s)
                .x1(s.to_s)
                .y0(0)
                .y1(1)
                .fill_color(colour(s.verdict).to_string())
                .opacity(0.12)
                .line(ShapeLine::new().width(0.0)),
        );
        notes.push(
            Annotation::new()
                .x_ref("x")
                .y_ref("paper")
                .x((s.from_s + s.to_s) / 2.0)
                .y(1.0)
                .y_anchor(plotly::common::Anchor::Bottom)
                .show_arrow(false)
                .text(format!("[{}] {}", s.index, s.verdict.name())),
        );
    }
    // levels
    for (name, l) in [
        ("spill", r.run.levels.spill),
        ("pause", r.run.levels.pause),
        ("terminate", r.run.levels.terminate),
    ] {
        let Some(l) = l else { continue };
        // only levels within reach of the chart
        if l as f64 > 1.5 * r.run.peak_process_bytes as f64 {
            continue;
        }
        shapes.push(
            Shape::new()
                .shape_type(ShapeType::Line)
                .x_ref("paper")
                .y_ref("y")
                .x0(0)
                .x1(1)
                .y0(mib(l))
                .y1(mib(l))
                .line(
                    ShapeLine::new()
                        .dash(DashType::Dash)
                        .width(1.0)
                        .color("#444"),
                ),
        );
        notes.push(
            Annotation::new()
                .x_ref("paper")
                .y_ref("y")
                .x(1.0)
                .y(mib(l))
                .x_anchor(plotly::common::Anchor::Right)
                .y_anchor(plotly::common::Anchor::Bottom)
                .show_arrow(false)
                .text(format!("{name} {}", bytes(l))),
        );
    }
    // purges and kernel events
    for e in &run.events {
        let (label, colour_) = match &e.item {
            Event::Purge(p) => (
                format!("{} −{}", p.reason, bytes(p.returned_bytes)),
                if p.is_probe() { "#d62728" } else { "#1f77b4" },
            ),
            Event::Level(l) => (format!("level {}", l.to), "#444"),
            Event::Terminate(_) => ("terminate".into(), "#000"),
            _ => continue,
        };
        shapes.push(
            Shape::new()
                .shape_type(ShapeType::Line)
                .x_ref("x")
                .y_ref("paper")
                .x0(e.t)
                .x1(e.t)
                .y0(0)
                .y1(0.95)
                .line(
                    ShapeLine::new()
                        .dash(DashType::Dot)
                        .width(1.0)
                        .color(colour_),
                ),
        );
        notes.push(
            Annotation::new()
                .x_ref("x")
                .y_ref("paper")
                .x(e.t)
                .y(0.95)
                .text_angle(-90.0)
                .y_anchor(plotly::common::Anchor::Top)
                .x_anchor(plotly::common::Anchor::Right)
                .show_arrow(false)
                .font(plotly::common::Font::new().size(9).color(colour_))
                .text(label),
        );
    }
    plot.set_layout(
        Layout::new()
            .height(520)
            .x_axis(Axis::new().title("seconds"))
            .y_axis(Axis::new().title("MiB"))
            .legend(
                Legend::new()
                    .orientation(plotly::common::Orientation::Horizontal)
                    .y(-0.18),
            )
            .shapes(shapes)
            .annotations(notes),
    );
    plot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        let text = r#"{"t_ms":0,"kind":"tick","process":104857600,"managed":0,"unmanaged_live":0,"hoarded":0,"non_heap":104857600}
{"t_ms":200,"kind":"tick","process":104857600,"managed":0,"unmanaged_live":0,"hoarded":0,"non_heap":104857600}"#;
        let run = Run::from_timeline(text.as_bytes()).expect("run");
        let report = crate::analyze(&run, &crate::Thresholds::default());
        let page = render(&run, &report);
        assert!(page.contains("Plotly.newPlot"), "no chart");
        assert!(
            page.contains("<script type=\"text/javascript\">"),
            "no inline script"
        );
        // plotly.js's own defaults name CDNs (map tiles, topojson) that
        // this chart never uses; what matters is that no tag loads a file
        for tag in [
            "<script src",
            "<script type=\"text/javascript\" src",
            "<link ",
        ] {
            assert!(
                !page.contains(tag),
                "the page must not load anything from the network ({tag})"
            );
        }
        assert!(page.len() > 1_000_000, "plotly.js is not inlined");
    }
}
