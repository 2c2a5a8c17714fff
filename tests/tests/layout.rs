//! The C structs that cross into Rust have the same size and field offsets
//! as their Rust mirrors, and the C enums the same members and values: read
//! from the BTF clang wrote into the object.

use amm_integration_tests::bpf_object;
use btf_rs::{Btf, Type};
use object::{Object, ObjectSection};

fn object_btf() -> Btf {
    let path = bpf_object();
    let data = std::fs::read(&path).expect("read the BPF object");
    let file = object::File::parse(&*data).expect("the BPF object is an ELF file");
    let section = file
        .section_by_name(".BTF")
        .expect("the object has BTF; build it with -g (cargo xtask build-ebpf does)");
    let bytes = section.data().expect("BTF section data");
    Btf::from_bytes(bytes).expect("parse the object's BTF")
}

#[test]
fn c_structs_match_their_rust_mirrors() {
    let btf = object_btf();
    for layout in amm_ebpf::layouts() {
        let types = btf
            .resolve_types_by_name(layout.c_name)
            .unwrap_or_else(|e| panic!("struct {} is not in the object's BTF: {e}", layout.c_name));
        let s = types
            .iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} is not a struct in BTF", layout.c_name));
        assert_eq!(
            s.size(),
            layout.size,
            "size of struct {} (C) vs its Rust mirror",
            layout.c_name
        );
        let c_fields: Vec<(String, usize)> = s
            .members
            .iter()
            .map(|m| {
                let name = btf.resolve_name(m).expect("member name");
                (name, (m.bit_offset() / 8) as usize)
            })
            .collect();
        let rust_fields: Vec<(String, usize)> = layout
            .fields
            .iter()
            .map(|(n, o)| (n.to_string(), *o))
            .collect();
        assert_eq!(
            c_fields, rust_fields,
            "fields (name, byte offset) of struct {} in C vs Rust",
            layout.c_name
        );
    }
}

#[test]
fn c_enums_match_their_rust_values() {
    let btf = object_btf();
    for e in amm_ebpf::c_enums() {
        let types = btf
            .resolve_types_by_name(e.c_name)
            .unwrap_or_else(|err| panic!("enum {} is not in the object's BTF: {err}", e.c_name));
        let c_members: Vec<(String, u64)> = types
            .iter()
            .find_map(|t| match t {
                Type::Enum(en) => Some(
                    en.members
                        .iter()
                        .map(|m| {
                            let name = btf.resolve_name(m).expect("member name");
                            (name, u64::from(m.val()))
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} is not an enum in BTF", e.c_name));
        let rust_members: Vec<(String, u64)> =
            e.members.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        assert_eq!(
            c_members, rust_members,
            "members (name, value) of enum {} in C vs Rust",
            e.c_name
        );
    }
}

#[test]
fn the_object_has_the_programs_and_maps_the_agent_expects() {
    let path = bpf_object();
    let data = std::fs::read(&path).expect("read the BPF object");
    let file = object::File::parse(&*data).expect("ELF");
    for (_, tracepoint) in amm_ebpf::PROGRAMS {
        let section = format!("tp_btf/{tracepoint}");
        assert!(
            file.section_by_name(&section).is_some(),
            "section {section} missing"
        );
    }
    let btf = object_btf();
    for map in [
        amm_ebpf::maps::WATCHES,
        amm_ebpf::maps::WATCH_BITS,
        amm_ebpf::maps::MM_OWNER,
        amm_ebpf::maps::EVENTS,
        amm_ebpf::maps::STATS,
    ] {
        assert!(
            !btf.resolve_ids_by_name(map).unwrap_or_default().is_empty(),
            "map {map} missing from the object's BTF"
        );
    }
}

/// The edges where a level can flip for `t`: 0, 2^64-1, and each threshold
/// with one byte either side.
fn edges(t: &amm_protocol::ThresholdBytes) -> Vec<u64> {
    let mut out = vec![0, 1, u64::MAX - 1, u64::MAX];
    for v in [t.spill, t.pause, t.terminate, t.rearm] {
        out.extend([v.saturating_sub(1), v, v.saturating_add(1)]);
    }
    out
}

/// Compiles the kernel program's `amm_level_of` (ebpf/c/amm.h) for the host
/// and returns the level it gives each (thresholds, rss).
fn c_levels(cases: &[(amm_protocol::ThresholdBytes, u64)]) -> Vec<u32> {
    use std::io::Write;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("level_of_host");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let built = std::process::Command::new(&clang)
        .args(["-O2", "-Wall", "-Werror", "-I"])
        .arg(root.join("../ebpf/c"))
        .arg(root.join("c/level_of_host.c"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} (cargo xtask build-ebpf needs it too): {e}")
        });
    assert!(built.success(), "{clang} failed on tests/c/level_of_host.c");
    let mut child = std::process::Command::new(&exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the host build of amm_level_of");
    let mut input = String::new();
    for (t, rss) in cases {
        input += &format!("{} {} {} {rss}\n", t.spill, t.pause, t.terminate);
    }
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write cases");
    drop(stdin);
    let out = child.wait_with_output().expect("levels");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("ascii")
        .lines()
        .map(|l| l.parse().expect("a level number"))
        .collect()
}

#[test]
fn the_kernel_s_level_of_and_rust_s_agree_on_every_edge() {
    use amm_protocol::Fractions;
    let default = Fractions::default();
    let fractions = [
        default,
        Fractions {
            spill: None,
            ..default
        },
        Fractions {
            pause: None,
            terminate: None,
            ..default
        },
        Fractions {
            target: None,
            spill: Some(0.5),
            pause: Some(0.5),
            terminate: Some(1.0),
        },
        Fractions {
            target: None,
            spill: None,
            pause: None,
            terminate: Some(0.95),
        },
    ];
    let limits = [
        1 << 20,
        4096 * 3 + 7,
        64 << 30,
        u64::MAX / 2,
        u64::MAX - 4096,
    ];
    let mut cases = Vec::new();
    for f in fractions {
        for limit in limits {
            let Ok(t) = f.to_bytes(limit) else { continue };
            cases.extend(edges(&t).into_iter().map(|rss| (t, rss)));
        }
    }
    assert!(cases.len() > 300, "too few cases: {}", cases.len());
    let c = c_levels(&cases);
    assert_eq!(c.len(), cases.len(), "one answer per case");
    for ((t, rss), c_level) in cases.iter().zip(c) {
        assert_eq!(
            t.level_of(*rss).raw(),
            c_level,
            "level of rss {rss} under {t:?}: Rust vs the kernel's C"
        );
    }
}
