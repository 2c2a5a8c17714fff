//! The HTML report's chart as inline SVG: the run's memory stacked
//! (managed, unmanaged_live, hoarded, non_heap, spilled on top; anonymous
//! and file/shared RSS for kernel-only runs), RSS as a line, levels as
//! dashed lines, purges and kernel events as dotted lines (probe purges in
//! red), each stretch shaded by its verdict with its headline as a tooltip.
//! No script and no library: a 10-minute run's page stays well under 1 MB.
//! Long runs are thinned to the lowest and highest RSS sample of each of
//! [`MAX_COLUMNS`] columns, so every spike still shows.

use std::fmt::Write;

use amm_timeline::{Event, Split, Tick};

use crate::input::{At, Run};
use crate::report::{Kind, Report};
use crate::units::bytes;

/// Columns a long run is thinned to (two samples each).
pub const MAX_COLUMNS: usize = 700;

const W: f64 = 1100.0;
const H: f64 = 440.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 74.0;
const MIB: f64 = (1u64 << 20) as f64;

/// The colour a verdict is shaded with.
pub fn colour(k: Kind) -> &'static str {
    match k {
        Kind::Killed => "#000000",
        Kind::Leak => "#d62728",
        Kind::NonHeapGrowth => "#8c564b",
        Kind::Undecided => "#bcbd22",
        Kind::Fragmentation => "#9467bd",
        Kind::Hoard => "#ff7f0e",
        Kind::BoundedCache => "#e377c2",
        Kind::Transient => "#17becf",
        Kind::ManagedGrowth => "#2ca02c",
        Kind::Steady => "#cccccc",
    }
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Maps seconds and MiB to the drawing.
struct Scale {
    t0: f64,
    t1: f64,
    top_mib: f64,
}

impl Scale {
    fn x(&self, t: f64) -> f64 {
        LEFT + (t - self.t0) / (self.t1 - self.t0).max(1e-9) * (W - LEFT - RIGHT)
    }
    fn y(&self, mib: f64) -> f64 {
        H - BOTTOM - mib / self.top_mib.max(1e-9) * (H - TOP - BOTTOM)
    }
}

/// The samples drawn: all of them, or the lowest and highest RSS of each
/// column.
fn thin(ticks: &[At<Tick>]) -> Vec<&At<Tick>> {
    if ticks.len() <= 2 * MAX_COLUMNS {
        return ticks.iter().collect();
    }
    let per = ticks.len().div_ceil(MAX_COLUMNS);
    let mut out = Vec::with_capacity(2 * MAX_COLUMNS);
    for col in ticks.chunks(per) {
        let lo = col.iter().enumerate().min_by_key(|(_, t)| t.process);
        let hi = col.iter().enumerate().max_by_key(|(_, t)| t.process);
        if let (Some((a, _)), Some((b, _))) = (lo, hi) {
            let (a, b) = (a.min(b), a.max(b));
            out.push(&col[a]);
            if b != a {
                out.push(&col[b]);
            }
        }
    }
    out
}

/// A "nice" step (1, 2 or 5 times a power of ten) for about `n` ticks.
fn step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// The layers stacked from the bottom: (name, colour, MiB per drawn tick).
fn layers(ticks: &[&At<Tick>]) -> Vec<(&'static str, &'static str, Vec<f64>)> {
    let mib = |v: u64| v as f64 / MIB;
    if ticks.iter().any(|k| k.split.is_some()) {
        let part = |f: fn(&Split) -> u64| -> Vec<f64> {
            ticks
                .iter()
                .map(|k| k.split.as_ref().map_or(0.0, |s| mib(f(s))))
                .collect()
        };
        vec![
            ("managed", "#2ca02c", part(|s| s.managed)),
            ("unmanaged_live", "#d62728", part(|s| s.unmanaged_live)),
            ("hoarded", "#ff7f0e", part(|s| s.hoarded)),
            ("non_heap", "#7f7f7f", part(|s| s.non_heap)),
            (
                "spilled (on disk, above RSS)",
                "#aec7e8",
                part(|s| s.spilled),
            ),
        ]
    } else {
        vec![
            (
                "anonymous RSS",
                "#9467bd",
                ticks
                    .iter()
                    .map(|k| mib(k.rss_anon.unwrap_or(k.process)))
                    .collect(),
            ),
            (
                "file + shared RSS",
                "#7f7f7f",
                ticks
                    .iter()
                    .map(|k| mib(k.rss_file_shmem.unwrap_or(0)))
                    .collect(),
            ),
        ]
    }
}

/// The chart, as an `<svg>` element.
pub fn chart(run: &Run, r: &Report) -> String {
    let ticks = thin(&run.ticks);
    let (t0, t1) = run.span();
    let layers = layers(&ticks);
    let mut stacked: Vec<Vec<f64>> = Vec::new();
    let mut below = vec![0.0; ticks.len()];
    for (_, _, v) in &layers {
        let top: Vec<f64> = below.iter().zip(v).map(|(a, b)| a + b).collect();
        stacked.push(top.clone());
        below = top;
    }
    let rss: Vec<f64> = ticks.iter().map(|k| k.process as f64 / MIB).collect();
    let peak = below.iter().chain(&rss).copied().fold(1.0, f64::max);
    let levels: Vec<(&str, u64)> = [
        ("spill", r.run.levels.spill),
        ("pause", r.run.levels.pause),
        ("terminate", r.run.levels.terminate),
    ]
    .into_iter()
    .filter_map(|(n, l)| l.map(|l| (n, l)))
    .filter(|(_, l)| (*l as f64 / MIB) <= 1.5 * peak)
    .collect();
    let top_mib = levels
        .iter()
        .map(|(_, l)| *l as f64 / MIB)
        .fold(peak, f64::max)
        * 1.05;
    let sc = Scale { t0, t1, top_mib };
    let mut o = String::new();
    let _ = draw(
        &mut o, run, r, &sc, &ticks, &layers, &stacked, &rss, &levels,
    );
    o
}

#[allow(clippy::too_many_arguments)]
fn draw(
    o: &mut String,
    run: &Run,
    r: &Report,
    sc: &Scale,
    ticks: &[&At<Tick>],
    layers: &[(&str, &str, Vec<f64>)],
    stacked: &[Vec<f64>],
    rss: &[f64],
    levels: &[(&str, u64)],
) -> std::fmt::Result {
    writeln!(
        o,
        "<svg id=\"amm-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" \
         width=\"100%\" font-family=\"system-ui,sans-serif\" font-size=\"11\" role=\"img\" \
         aria-label=\"memory of the run over time\">"
    )?;
    stretches(o, r, sc)?;
    axes(o, sc)?;
    let xs: Vec<f64> = ticks.iter().map(|k| sc.x(k.t)).collect();
    let zero = vec![0.0; ticks.len()];
    for (k, (name, colour, _)) in layers.iter().enumerate() {
        let low = if k == 0 { &zero } else { &stacked[k - 1] };
        let mut d = String::new();
        for (i, x) in xs.iter().enumerate() {
            let _ = write!(
                d,
                "{}{x:.1},{:.1}",
                if i == 0 { "M" } else { "L" },
                sc.y(stacked[k][i])
            );
        }
        for (i, x) in xs.iter().enumerate().rev() {
            let _ = write!(d, "L{x:.1},{:.1}", sc.y(low[i]));
        }
        writeln!(
            o,
            "<path d=\"{d}Z\" fill=\"{colour}\" fill-opacity=\"0.75\" stroke=\"none\"><title>{}</title></path>",
            esc(name)
        )?;
    }
    let mut d = String::new();
    for (i, x) in xs.iter().enumerate() {
        let _ = write!(
            d,
            "{}{x:.1},{:.1}",
            if i == 0 { "M" } else { "L" },
            sc.y(rss[i])
        );
    }
    writeln!(
        o,
        "<path d=\"{d}\" fill=\"none\" stroke=\"#000\" stroke-width=\"1.3\"><title>process (RSS)</title></path>"
    )?;
    for (name, l) in levels {
        let y = sc.y(*l as f64 / MIB);
        writeln!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#444\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#444\">{name} {}</text>",
            W - RIGHT,
            W - RIGHT - 2.0,
            y - 3.0,
            esc(&bytes(*l))
        )?;
    }
    events(o, run, sc)?;
    legend(o, layers)?;
    writeln!(o, "</svg>")
}

/// Each stretch shaded by its verdict, its number and verdict on top.
fn stretches(o: &mut String, r: &Report, sc: &Scale) -> std::fmt::Result {
    for s in &r.stretches {
        let (x0, x1) = (sc.x(s.from_s), sc.x(s.to_s));
        writeln!(
            o,
            "<rect x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"0.12\">\
             <title>[{}] {}: {}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">[{}] {}</text>",
            (x1 - x0).max(0.5),
            H - TOP - BOTTOM,
            colour(s.verdict),
            s.index,
            esc(s.verdict.name()),
            esc(&s.headline),
            (x0 + x1) / 2.0,
            TOP - 6.0,
            s.index,
            esc(s.verdict.name())
        )?;
    }
    Ok(())
}

/// Axes, grid and tick labels (seconds, MiB).
fn axes(o: &mut String, sc: &Scale) -> std::fmt::Result {
    let (x0, x1, y0) = (LEFT, W - RIGHT, H - BOTTOM);
    let dy = step(sc.top_mib, 6.0);
    let mut v = 0.0;
    while v <= sc.top_mib {
        let y = sc.y(v);
        writeln!(
            o,
            "<line x1=\"{x0}\" x2=\"{x1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
            x0 - 4.0,
            y + 4.0
        )?;
        v += dy;
    }
    let dt = step(sc.t1 - sc.t0, 10.0);
    let mut t = (sc.t0 / dt).ceil() * dt;
    while t <= sc.t1 {
        let x = sc.x(t);
        writeln!(
            o,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{y0}\" y2=\"{:.1}\" stroke=\"#999\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y0 + 4.0,
            y0 + 16.0,
            (t * 1000.0).round() / 1000.0
        )?;
        t += dt;
    }
    writeln!(
        o,
        "<line x1=\"{x0}\" x2=\"{x1}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#666\"/>\
         <line x1=\"{x0}\" x2=\"{x0}\" y1=\"{TOP}\" y2=\"{y0}\" stroke=\"#666\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds</text>\
         <text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">MiB</text>",
        (x0 + x1) / 2.0,
        y0 + 30.0,
        (TOP + y0) / 2.0
    )
}

/// Events labelled on the chart at most; beyond, each keeps its line and a
/// tooltip.
const MAX_LABELS: usize = 40;

/// Purges and kernel events as dotted vertical lines with a label (a
/// tooltip only, when there are more than [`MAX_LABELS`]).
fn events(o: &mut String, run: &Run, sc: &Scale) -> std::fmt::Result {
    let shown = run
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.item,
                Event::Purge(_) | Event::Level(_) | Event::Terminate(_) | Event::Exit(_)
            )
        })
        .count();
    for e in &run.events {
        let (label, colour) = match &e.item {
            Event::Purge(p) => (
                format!("{} −{}", p.reason, bytes(p.returned_bytes)),
                if p.is_probe() { "#d62728" } else { "#1f77b4" },
            ),
            Event::Level(l) => (format!("level {}", l.to), "#444"),
            Event::Terminate(_) => ("terminate".into(), "#000"),
            Event::Exit(x) if x.signal.is_some() => ("killed".into(), "#000"),
            _ => continue,
        };
        let x = sc.x(e.t);
        let label = esc(&format!("{label} at {:.1} s", e.t));
        writeln!(
            o,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"{colour}\" \
             stroke-dasharray=\"2 3\" stroke-opacity=\"0.6\"><title>{label}</title></line>",
            H - BOTTOM,
        )?;
        if shown <= MAX_LABELS {
            writeln!(
                o,
                "<text transform=\"translate({:.1} {:.1}) rotate(-90)\" text-anchor=\"end\" \
                 font-size=\"9\" fill=\"{colour}\">{label}</text>",
                x - 2.0,
                TOP + 4.0,
            )?;
        }
    }
    Ok(())
}

/// The legend under the axis.
fn legend(o: &mut String, layers: &[(&str, &str, Vec<f64>)]) -> std::fmt::Result {
    let y = H - 22.0;
    let mut x = LEFT;
    for (name, colour, _) in layers {
        writeln!(
            o,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 9.0,
            x + 16.0,
            esc(name)
        )?;
        x += 24.0 + 6.5 * name.len() as f64;
    }
    writeln!(
        o,
        "<line x1=\"{x:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\" stroke-width=\"1.3\"/>\
         <text x=\"{:.1}\" y=\"{y:.1}\">process (RSS)</text>",
        x + 14.0,
        y - 4.0,
        y - 4.0,
        x + 18.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_run_is_thinned_and_keeps_its_spikes() {
        let ticks: Vec<At<Tick>> = (0..3000)
            .map(|i| At {
                t: i as f64 * 0.2,
                attempt: 0,
                item: Tick::rss(if i == 1234 { 900 << 20 } else { 100 << 20 }),
            })
            .collect();
        let drawn = thin(&ticks);
        assert!(drawn.len() <= 2 * MAX_COLUMNS, "{}", drawn.len());
        assert!(
            drawn.iter().any(|k| k.process == 900 << 20),
            "the spike was lost"
        );
        assert!(drawn.windows(2).all(|w| w[0].t < w[1].t));
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(step(600.0, 10.0), 100.0);
        assert_eq!(step(13.0, 10.0), 2.0);
        assert_eq!(step(0.9, 6.0), 0.2);
    }
}
