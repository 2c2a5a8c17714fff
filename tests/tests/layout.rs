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
