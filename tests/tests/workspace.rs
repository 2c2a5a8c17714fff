//! The workspace's folders say who uses what (issue 13).
//!
//! `agent/` and `worker/` are the two sides of amm. A crate one side links
//! from the other lives in that side's `shared/` folder (`agent/shared/…`,
//! `worker/shared/…`), so a newcomer sees from the path alone that changing
//! it changes both sides. This test reads `cargo metadata` and fails when a
//! path dependency crosses sides anywhere but into `shared/`, or when a crate
//! sits in `shared/` that the other side does not link (then it is not
//! shared and belongs beside its only user).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Which side of amm a manifest directory belongs to, relative to the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Agent,
    Worker,
}

/// A workspace crate: its name, side (if any), whether it sits in `shared/`,
/// and the directories of its path dependencies.
struct Crate {
    name: String,
    dir: PathBuf,
    side: Option<Side>,
    shared: bool,
    path_deps: Vec<PathBuf>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent: the workspace root")
        .to_path_buf()
}

fn side_of(relative: &Path) -> (Option<Side>, bool) {
    let mut parts = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy());
    let side = match parts.next().as_deref() {
        Some("agent") => Some(Side::Agent),
        Some("worker") => Some(Side::Worker),
        _ => None,
    };
    let shared = parts.next().as_deref() == Some("shared");
    (side, side.is_some() && shared)
}

/// Every workspace crate, from `cargo metadata --no-deps` (no network).
fn crates() -> Vec<Crate> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = root();
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("metadata has packages");
    packages
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest.parent().expect("a manifest has a directory");
            let relative = dir
                .strip_prefix(&root)
                .expect("workspace crates are under the root");
            let (side, shared) = side_of(relative);
            let path_deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter_map(|d| d["path"].as_str())
                .map(|d| Path::new(d).strip_prefix(&root).map(Path::to_path_buf))
                .collect::<Result<_, _>>()
                .expect("path dependencies stay inside the workspace");
            Crate {
                name: p["name"].as_str().expect("name").to_string(),
                dir: relative.to_path_buf(),
                side,
                shared,
                path_deps,
            }
        })
        .collect()
}

#[test]
fn a_dependency_across_sides_points_into_shared() {
    let crates = crates();
    assert!(
        crates.len() >= 10,
        "cargo metadata listed {} crates",
        crates.len()
    );
    let mut wrong = Vec::new();
    for krate in crates.iter().filter(|c| c.side.is_some()) {
        for dep in &krate.path_deps {
            let (dep_side, dep_shared) = side_of(dep);
            if dep_side.is_some() && dep_side != krate.side && !dep_shared {
                wrong.push(format!(
                    "{} ({}) links {}",
                    krate.name,
                    krate.dir.display(),
                    dep.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a crate linked across agent/ and worker/ must live in that side's shared/ folder: {wrong:#?}"
    );
}

#[test]
fn every_shared_crate_is_linked_by_the_other_side() {
    let crates = crates();
    let shared: Vec<&Crate> = crates.iter().filter(|c| c.shared).collect();
    assert!(
        shared.len() >= 2,
        "no crate found under agent/shared or worker/shared"
    );
    for krate in shared {
        let users: Vec<&str> = crates
            .iter()
            .filter(|c| c.side.is_some() && c.side != krate.side)
            .filter(|c| c.path_deps.contains(&krate.dir))
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            !users.is_empty(),
            "{} sits in {} but no crate of the other side links it: move it beside its users",
            krate.name,
            krate.dir.display()
        );
    }
}
