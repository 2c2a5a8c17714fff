//! The SpillBuffer and its disk format: round trips, corrupt / truncated /
//! missing / swapped files detected with the key named, a full disk and
//! max-spill failing cleanly with no data lost, and reading back more than
//! the target one value at a time.

mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use amm_worker::spill::{
    Part, SpillBuffer, SpillDir, SpillError, SpillOptions, Value, WriteOptions,
};
use common::*;
use proptest::prelude::*;

fn buffer(dir: &std::path::Path, target: Option<u64>, max_spill: Option<u64>) -> SpillBuffer {
    SpillBuffer::new(
        SpillDir::open(dir, "t").expect("spill dir"),
        SpillOptions {
            target,
            max_spill,
            write: WriteOptions {
                fsync: false,
                drop_cache: true,
            },
        },
    )
}

fn value(seed: u8, n: usize) -> Value {
    Value {
        meta: [seed as u64, n as u64, 7, 9],
        parts: vec![
            Part::U8((0..n).map(|i| (i as u8).wrapping_mul(seed)).collect()),
            Part::F64((0..n / 8).map(|i| i as f64 * 0.5 + seed as f64).collect()),
            Part::U32((0..n / 4).map(|i| i as u32 ^ seed as u32).collect()),
            Part::U64(vec![u64::MAX, 0, seed as u64]),
        ],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn any_value_round_trips(
        key in "[a-zA-Z0-9/_.-]{1,40}",
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        floats in proptest::collection::vec(any::<f64>(), 0..700),
        ints in proptest::collection::vec(any::<u32>(), 0..300),
        meta in any::<[u64; 4]>(),
    ) {
        let tmp = tempfile::tempdir().expect("tmp");
        let b = buffer(tmp.path(), None, None);
        let v = Value { meta, parts: vec![Part::U8(bytes), Part::F64(floats), Part::U32(ints)] };
        b.put(&key, v.clone());
        prop_assert!(b.evict().expect("evict").is_some());
        prop_assert!(!b.in_memory(&key));
        let back = b.get(&key).expect("get");
        // Bit-exact (NaN payloads included).
        prop_assert_eq!(back.meta, v.meta);
        for (a, c) in back.parts.iter().zip(&v.parts) {
            prop_assert_eq!(a.as_bytes(), c.as_bytes());
        }
    }
}

/// Spills `key` and returns its file.
fn spilled(b: &SpillBuffer, key: &str, v: Value) -> std::path::PathBuf {
    b.put(key, v);
    while b.in_memory(key) {
        b.evict().expect("evict");
    }
    b.file_of(key).expect("file")
}

#[test]
fn corrupt_truncated_missing_and_swapped_files_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = buffer(tmp.path(), None, None);

    // A flipped payload byte.
    let p = spilled(&b, "flip", value(3, 100_000));
    let mut f = OpenOptions::new().write(true).open(&p).expect("open");
    f.seek(SeekFrom::Start(50_000)).expect("seek");
    f.write_all(&[0xFF ^ 42]).expect("write");
    drop(f);
    match b.get("flip") {
        Err(SpillError::Corrupt { key, reason, .. }) => {
            assert_eq!(key, "flip");
            assert!(reason.contains("payload checksum"), "{reason}");
        }
        other => panic!("flipped byte not detected: {other:?}"),
    }
    // The error repeats (no crash, no wrong data) and the file stays.
    assert!(matches!(b.get("flip"), Err(SpillError::Corrupt { .. })));
    assert!(p.exists());

    // A flipped header byte.
    let p = spilled(&b, "hdr", value(4, 1000));
    let mut f = OpenOptions::new().write(true).open(&p).expect("open");
    f.seek(SeekFrom::Start(30)).expect("seek");
    f.write_all(&[0x5A]).expect("write");
    drop(f);
    let e = b.get("hdr").expect_err("corrupt header");
    assert!(
        e.to_string().contains("\"hdr\"") && e.to_string().contains("corrupt"),
        "{e}"
    );

    // Truncated in the payload, and in the header.
    let p = spilled(&b, "short", value(5, 100_000));
    let len = std::fs::metadata(&p).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(len - 10)
        .expect("truncate");
    match b.get("short") {
        Err(SpillError::Truncated { key, .. }) => assert_eq!(key, "short"),
        other => panic!("truncation not detected: {other:?}"),
    }
    let p = spilled(&b, "stub", value(6, 1000));
    OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(20)
        .expect("truncate");
    assert!(matches!(b.get("stub"), Err(SpillError::Truncated { key, .. }) if key == "stub"));

    // Too long is corrupt as well.
    let p = spilled(&b, "long", value(7, 1000));
    OpenOptions::new()
        .append(true)
        .open(&p)
        .expect("open")
        .write_all(b"junk")
        .expect("append");
    assert!(matches!(b.get("long"), Err(SpillError::Corrupt { key, .. }) if key == "long"));

    // Missing.
    let p = spilled(&b, "gone", value(8, 1000));
    std::fs::remove_file(&p).expect("rm");
    let e = b.get("gone").expect_err("missing");
    assert!(matches!(&e, SpillError::Missing { key, .. } if key == "gone"));
    assert!(e.to_string().contains("\"gone\""), "{e}");

    // Two files swapped: each holds the other key.
    let pa = spilled(&b, "a", value(9, 1000));
    let pb = spilled(&b, "b", value(10, 1000));
    let tmpf = tmp.path().join("swap");
    std::fs::rename(&pa, &tmpf).expect("mv");
    std::fs::rename(&pb, &pa).expect("mv");
    std::fs::rename(&tmpf, &pb).expect("mv");
    match b.get("a") {
        Err(SpillError::Corrupt { key, reason, .. }) => {
            assert_eq!(key, "a");
            assert!(reason.contains("holds key \"b\""), "{reason}");
        }
        other => panic!("swap not detected: {other:?}"),
    }

    // Healthy values are unaffected.
    let v = value(11, 5000);
    spilled(&b, "ok", v.clone());
    assert_eq!(*b.get("ok").expect("ok"), v);
}

#[test]
fn max_spill_fails_cleanly_and_keeps_the_value() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = buffer(tmp.path(), None, Some(3 * MIB));
    for i in 0..5u8 {
        b.put(&format!("k{i}"), Value::bytes(vec![i; MIB as usize]));
    }
    let mut ok = 0;
    let err = loop {
        match b.evict() {
            Ok(Some(_)) => ok += 1,
            Ok(None) => panic!("ran out of values before max-spill"),
            Err(e) => break e,
        }
    };
    assert_eq!(ok, 2, "3 MiB holds two 1 MiB values with headers");
    assert!(
        matches!(&err, SpillError::MaxSpill { key, .. } if key == "k2"),
        "{err}"
    );
    assert!(b.in_memory("k2"));
    for i in 0..5u8 {
        assert_eq!(
            b.get(&format!("k{i}")).expect("get").parts[0],
            Part::U8(vec![i; MIB as usize])
        );
    }
    assert!(b.stats().disk <= 3 * MIB);
}

#[test]
fn eviction_on_a_full_disk_fails_cleanly() {
    if !require_root("eviction_on_a_full_disk_fails_cleanly") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let mnt = tmp.path().join("disk");
    let _fs = Tmpfs::mount(&mnt, "8m");
    let b = buffer(&mnt, None, None);
    for i in 0..16u8 {
        b.put(&format!("k{i:02}"), Value::bytes(vec![i; MIB as usize]));
    }
    let mut written = 0;
    let err = loop {
        match b.evict() {
            Ok(Some(_)) => written += 1,
            Ok(None) => panic!("16 MiB fit on an 8 MiB disk"),
            Err(e) => break e,
        }
    };
    assert!((5..8).contains(&written), "{written} values written");
    let key = match &err {
        SpillError::DiskFull { key, .. } => key.clone(),
        other => panic!("expected DiskFull, got {other}"),
    };
    assert!(err.to_string().contains(&key) && err.to_string().contains("no space left"));
    // Retried: still a clean failure, still in memory.
    assert!(matches!(b.evict(), Err(SpillError::DiskFull { .. })));
    assert!(b.in_memory(&key));
    // No half-written file left: only the lock and the complete values.
    let files = std::fs::read_dir(b.dir())
        .expect("ls")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "spill"))
        .count();
    assert_eq!(files, written);
    // Every value is intact, wherever it is.
    for i in 0..16u8 {
        let v = b.get(&format!("k{i:02}")).expect("get");
        assert_eq!(v.parts[0], Part::U8(vec![i; MIB as usize]), "k{i:02}");
    }
    drop(b);
}

#[test]
fn reading_back_more_than_the_target_brings_values_back_one_at_a_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = 8 * MIB;
    let b = Arc::new(buffer(tmp.path(), Some(target), None));
    for i in 0..32u8 {
        b.put(&format!("k{i:02}"), Value::bytes(vec![i; MIB as usize]));
    }
    assert!(b.stats().managed <= target);
    assert!(b.stats().spilled >= 24 * MIB);
    let one = Value::bytes(vec![0; MIB as usize]).sizeof();
    // Ask for all 32 MiB, from two threads.
    std::thread::scope(|s| {
        for t in 0..2u8 {
            let b = b.clone();
            s.spawn(move || {
                for i in (t..32).step_by(2) {
                    let v = b.get(&format!("k{i:02}")).expect("get");
                    assert_eq!(v.parts[0], Part::U8(vec![i; MIB as usize]));
                    assert!(
                        b.stats().managed <= target + 2 * one,
                        "managed {} after reading k{i:02}",
                        b.stats().managed
                    );
                }
            });
        }
    });
    assert!(b.stats().unspill_count >= 24);
}

#[test]
fn a_value_being_written_stays_readable_and_deletes_are_safe() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = Arc::new(buffer(tmp.path(), None, None));
    for i in 0..8u8 {
        b.put(&format!("k{i}"), Value::bytes(vec![i; 4 * MIB as usize]));
    }
    std::thread::scope(|s| {
        let w = b.clone();
        s.spawn(move || while w.evict().expect("evict").is_some() {});
        for _ in 0..50 {
            for i in 0..8u8 {
                let v = b.get(&format!("k{i}")).expect("get");
                assert_eq!(v.parts[0].as_bytes()[12345], i);
            }
        }
    });
    for i in 0..8u8 {
        assert!(b.delete(&format!("k{i}")));
    }
    let st = b.stats();
    assert_eq!(
        (st.managed, st.spilled, st.disk, st.keys),
        (0, 0, 0, 0),
        "{st:?}"
    );
    let left = std::fs::read_dir(b.dir())
        .expect("ls")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "spill"))
        .count();
    assert_eq!(left, 0);
}
