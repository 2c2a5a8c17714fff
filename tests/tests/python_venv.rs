//! The project's Python venv (`cargo xtask venv`) holds exactly the pins of
//! `worker/dask/requirements-test.txt`: the Dask tests and benchmarks run on
//! those versions, in CI too. Missing venv: a failure that says how to make
//! it, never a skip.

use std::collections::BTreeMap;
use std::process::Command;

use amm_integration_tests::python;

/// `name==version` lines of a requirements file, names normalised as pip
/// does (lower case, `_`/`.` → `-`), extras dropped.
fn pins(text: &str) -> BTreeMap<String, String> {
    let norm = |n: &str| {
        n.split('[')
            .next()
            .unwrap_or(n)
            .to_lowercase()
            .replace(['_', '.'], "-")
    };
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once("=="))
        .map(|(n, v)| (norm(n.trim()), v.trim().to_string()))
        .collect()
}

#[test]
fn the_venv_holds_every_pinned_version() {
    let py = python::find().unwrap_or_else(|e| panic!("{e:#}"));
    let req = python::workspace_root().join("worker/dask/requirements-test.txt");
    let wanted = pins(&std::fs::read_to_string(&req).expect("read the requirements"));
    assert!(
        wanted.len() > 20,
        "the requirements pin too little: {wanted:?}"
    );
    let out = Command::new(&py)
        .args(["-m", "pip", "freeze", "--disable-pip-version-check"])
        .output()
        .expect("run pip freeze");
    assert!(out.status.success(), "pip freeze failed: {out:?}");
    let have = pins(&String::from_utf8_lossy(&out.stdout));
    for (name, version) in &wanted {
        assert_eq!(
            have.get(name),
            Some(version),
            "{} has {name} {:?}, the pin is {version}: run `cargo xtask venv`",
            py.display(),
            have.get(name)
        );
    }
}
