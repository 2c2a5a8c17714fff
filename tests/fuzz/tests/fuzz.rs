//! Each fuzz target for a bounded time (`AMM_FUZZ_SECS`, default 12 s),
//! after replaying its corpus. A crash fails the test and names the saved
//! input.

use std::time::Duration;

use amm_fuzz::{TARGETS, Target, fuzz};

fn budget() -> Duration {
    let secs = std::env::var("AMM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(12.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("AMM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn run(name: &str) {
    let t: &Target = TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no target {name}"));
    let seed = seed();
    let out = fuzz(t, budget(), seed);
    // Straight to stderr: the harness captures println!, and CI should show
    // how much each target ran.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "FUZZ {name}: {} corpus inputs, {} executions, seed {seed}, {} crashes",
        out.replayed,
        out.executions,
        out.crashes.len()
    );
    assert!(out.replayed > 0, "the corpus of {name} is empty");
    assert!(
        out.crashes.is_empty(),
        "{name} crashed (AMM_FUZZ_SEED={seed}):\n{}",
        out.crashes
            .iter()
            .map(|(p, e)| format!("  {}: {e}", p.display()))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn fuzz_frame() {
    run("frame");
}

#[test]
fn fuzz_spill_file() {
    run("spill_file");
}

#[test]
fn fuzz_workload() {
    run("workload");
}

#[test]
fn fuzz_config() {
    run("config");
}

#[test]
fn fuzz_timeline() {
    run("timeline");
}

#[test]
fn mutations_change_inputs_and_stay_bounded() {
    let mut rng = amm_fuzz::Rng::new(7);
    let seed = b"[worker.memory]\ntarget = 0.6\n";
    let changed = (0..200)
        .filter(|_| amm_fuzz::mutate(&mut rng, seed, seed, true) != seed.to_vec())
        .count();
    assert!(
        changed > 150,
        "{changed} of 200 mutations changed the input"
    );
}
