//! `amm-record`: show a process's allocator record, or ask it to purge.
//!
//! ```text
//! amm-record show PID          one JSON line: the record's facts and statistics
//! amm-record purge PID [MS]    request a purge, wait up to MS ms (default 5000)
//! ```

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amm-record: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: amm-record show PID | amm-record purge PID [TIMEOUT_MS]";
    let (cmd, pid) = match args {
        [cmd, pid, ..] => (cmd.as_str(), pid),
        _ => return Err(usage.to_string()),
    };
    let pid: i32 = pid
        .parse()
        .map_err(|_| format!("{pid:?} is not a pid; {usage}"))?;
    match cmd {
        "show" => {
            let reader = amm_record::open(pid).map_err(|e| e.to_string())?;
            let snap = reader.snapshot().map_err(|e| e.to_string())?;
            let line = serde_json::json!({
                "task": reader.task(), "record": reader.info(), "snapshot": snap,
                "live": snap.live(), "resident": snap.resident(), "hoarded": snap.hoarded(),
                "purgeable": snap.purgeable(), "age_ms": snap.age().as_secs_f64() * 1e3,
            });
            println!("{line}");
            Ok(())
        }
        "purge" => {
            let ms: u64 = match args.get(2) {
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("{v:?} is not a timeout in ms"))?,
                None => 5000,
            };
            let (reader, ticket) = amm_record::request_purge(pid).map_err(|e| e.to_string())?;
            match reader
                .wait_purge(ticket, Duration::from_millis(ms))
                .map_err(|e| e.to_string())?
            {
                Some(snap) => {
                    println!(
                        "{}",
                        serde_json::json!({"ticket": ticket, "purge": snap.stats.purge})
                    );
                    Ok(())
                }
                None => Err(format!("process {pid} did not answer within {ms} ms")),
            }
        }
        other => Err(format!("unknown command {other:?}; {usage}")),
    }
}
