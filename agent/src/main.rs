fn main() -> anyhow::Result<()> {
    let mut p = amm_agent::probe::Probe::load(None)?;
    let pid: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("loaded {:?}", p);
    let cfg = amm_ebpf::WatchConfig {
        limit_bytes: 1 << 30,
        rearm_bytes: 600 << 20,
        spill_bytes: 700 << 20,
        pause_bytes: 800 << 20,
        terminate_bytes: 950 << 20,
        spike_horizon_ns: 200_000_000,
        flags: 0,
        signal: 0,
    };
    p.watch(pid, cfg)?;
    let mut ev = p.take_events().unwrap();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        while let Some(e) = ev.next() {
            println!("{e:?}");
        }
    }
    println!("{:?}", p.watch_of(pid));
    Ok(())
}
