//! Fuzz targets for the parsers that read what amm does not control, and a
//! small mutation fuzzer that drives them from a corpus kept in the repo.
//!
//! | target | entry point | input |
//! | --- | --- | --- |
//! | `frame` | `amm_protocol::read_frame` + `decode::<ClientMessage>` / `<ServerMessage>` | bytes from a socket client |
//! | `spill_file` | `amm_worker::spill::format::decode` | a spill file's bytes |
//! | `workload` | `amm_worker::workload::Workload::parse` | a workload TOML file |
//! | `config` | `amm_worker::config::Loader` (TOML, env, flags) and `LimitSpec` | a config file, `--memory-limit` |
//! | `timeline` | `amm_report::Run::from_timeline` | a timeline file given to `amm-worker report` |
//!
//! **Why a mutation fuzzer in a test crate.** The toolchain is stable Rust
//! only: `cargo fuzz` (libFuzzer) wants nightly for its sanitizers and a
//! C++ build of libFuzzer, `cargo afl` an AFL++ build; neither belongs in a
//! two-minute CI step on a fresh machine. Random bytes never get past a
//! magic number, a CRC or a JSON brace, so the fuzzer starts from valid
//! seeds (`corpus/<target>/`) and mutates them: bit flips, interesting
//! bytes, insertions, deletions, splices of two seeds, truncation, and, for
//! text, swaps of numbers and keywords for `nan`, `inf`, `-1`, huge and
//! fractional values. Each target is a plain function, so a coverage-guided
//! engine can drive the same entry points later. A panic is a crash: the
//! input is written to `crashes/` and the test fails naming it; once fixed,
//! the input moves to the corpus and is replayed on every run.
//!
//! Budget: `AMM_FUZZ_SECS` seconds per target (default 12; CI runs the
//! default), `AMM_FUZZ_SEED` to replay a run. Release (see
//! `tests/README.md`, "Fuzzing"): `AMM_FUZZ_SECS=1800 cargo test --release
//! -p amm-fuzz -- --test-threads 1`.

use std::io::BufReader;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One fuzz target: a name (its corpus folder) and the function that must
/// never panic, whatever the bytes.
pub struct Target {
    /// Corpus folder name.
    pub name: &'static str,
    /// Whether inputs are text (mutated with text tokens too).
    pub text: bool,
    /// The code under test.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        text: false,
        run: frame,
    },
    Target {
        name: "spill_file",
        text: false,
        run: spill_file,
    },
    Target {
        name: "workload",
        text: true,
        run: workload,
    },
    Target {
        name: "config",
        text: true,
        run: config,
    },
    Target {
        name: "timeline",
        text: true,
        run: timeline,
    },
];

/// The agent's framing and message parser, both directions.
pub fn frame(data: &[u8]) {
    let mut r = data;
    while let Ok(body) = amm_protocol::read_frame(&mut r) {
        let _ = amm_protocol::decode::<amm_protocol::ClientMessage>(&body);
        let _ = amm_protocol::decode::<amm_protocol::ServerMessage>(&body);
    }
    let _ = amm_protocol::decode::<amm_protocol::ClientMessage>(data);
}

/// The spill file reader: the first line-feed-free 64 bytes name the key
/// asked for, the rest is the file.
pub fn spill_file(data: &[u8]) {
    let (key, file) = match data.iter().position(|&b| b == b'\n') {
        Some(i) if i <= 64 => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        _ => ("k".to_string(), data),
    };
    let mut r = file;
    let _ = amm_worker::spill::format::decode(&mut r, file.len() as u64, &key, |_, _| {});
}

/// The workload parser (TOML, then the checks of every op).
pub fn workload(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = amm_worker::workload::Workload::parse(text, "fuzz");
    }
}

/// The config layers: a TOML file, each line as an environment variable
/// and as a flag value, and each line as a `--memory-limit`.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut l = amm_worker::config::Loader::new();
    if l.toml_text(text, "fuzz").is_ok() {
        let _ = l.build();
    }
    for line in text.lines().take(64) {
        let _ = line.parse::<amm_worker::limit::LimitSpec>();
        let _ = amm_worker::units::parse_bytes(line);
        let _ = amm_worker::units::parse_duration(line);
        if let Some((k, v)) = line.split_once('=') {
            let mut l = amm_worker::config::Loader::new();
            if l.env(vec![(k.trim().to_string(), v.to_string())]).is_ok() {
                let _ = l.build();
            }
            let mut l = amm_worker::config::Loader::new();
            let raw = amm_worker::config::Raw::from_text(v);
            if l.set(k.trim(), raw, "fuzz").is_ok() {
                let _ = l.build();
            }
        }
    }
}

/// The report's timeline reader, then the analysis and the text rendering
/// of what it read.
pub fn timeline(data: &[u8]) {
    if let Ok(run) = amm_report::Run::from_timeline(BufReader::new(data)) {
        let report = amm_report::analyze(&run, &amm_report::Thresholds::default());
        let _ = amm_report::render(&run, &report, amm_report::Format::Text);
    }
}

/// A small, fast, seedable generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1",
    "1.5",
    "0.0",
    "1e309",
    "1e-300",
    "2e-9",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "4294967296",
    "true",
    "false",
    "\"\"",
    "\"0.4B\"",
    "\"1e400GiB\"",
    "\"-5s\"",
    "\"99999999999TiB\"",
    "[]",
    "{}",
    "\"\u{fffd}\"",
    "null",
    "\"\\u0000\"",
];

/// One mutation of `seed` (and sometimes a second seed `other`).
pub fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8], text: bool) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(if text { 9 } else { 7 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0, 0xff, 0x7f, 0x80, b'\n', b'"', b'9'][rng.below(7)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                // duplicate a slice (repeated fields, lines, parts)
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let dup = v[i..i + n].to_vec();
                v.splice(i..i, dup);
            }
            7 | 8 => replace_token(rng, &mut v),
            _ => {}
        }
    }
    v.truncate(1 << 16);
    v
}

/// Replaces a number or word in text with a hostile token.
fn replace_token(rng: &mut Rng, v: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| {
            let c = v[i];
            (c.is_ascii_alphanumeric() || c == b'"' || c == b'-')
                && (i == 0 || matches!(v[i - 1], b' ' | b'=' | b':' | b',' | b'['))
        })
        .collect();
    if starts.is_empty() {
        return;
    }
    let i = starts[rng.below(starts.len())];
    let end = (i..v.len())
        .find(|&j| matches!(v[j], b',' | b'\n' | b'}' | b']' | b' '))
        .unwrap_or(v.len());
    let token = TOKENS[rng.below(TOKENS.len())].as_bytes().to_vec();
    v.splice(i..end, token);
}

/// The corpus folder of a target.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The corpus of a target, sorted by name.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.path(), std::fs::read(e.path()).ok()?)))
        .collect();
    out.sort();
    out
}

/// Runs `input` through the target; `Err` with the panic message if it
/// panicked.
pub fn try_one(t: &Target, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string())
    })
}

/// What a fuzzing run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Corpus inputs replayed.
    pub replayed: usize,
    /// Mutated inputs run.
    pub executions: u64,
    /// Crashing inputs, saved under `crashes/`.
    pub crashes: Vec<(PathBuf, String)>,
}

/// Replays the corpus of `t`, then mutates it for `budget`.
pub fn fuzz(t: &Target, budget: Duration, seed: u64) -> Outcome {
    let seeds = corpus(t.name);
    let mut out = Outcome::default();
    for (path, input) in &seeds {
        out.replayed += 1;
        if let Err(e) = try_one(t, input) {
            out.crashes.push((path.clone(), e));
        }
    }
    if seeds.is_empty() {
        return out;
    }
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    while start.elapsed() < budget && out.crashes.len() < 5 {
        let a = &seeds[rng.below(seeds.len())].1;
        let b = &seeds[rng.below(seeds.len())].1;
        let input = mutate(&mut rng, a, b, t.text);
        out.executions += 1;
        if let Err(e) = try_one(t, &input) {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{}-{seed}-{}", t.name, out.executions));
            let _ = std::fs::write(&path, &input);
            out.crashes.push((path, e));
        }
    }
    out
}
