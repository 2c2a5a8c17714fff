//! amm_dask on real Dask: runs `worker/dask/tests` (pytest) in the
//! project's venv against the real binaries — a real amm-agent, a real
//! `dask scheduler`, real `dask worker` processes in their own memory
//! cgroups. Needs root; skips visibly outside CI and fails in CI.

use std::process::Command;

use amm_integration_tests::{bin, bpf_object, python, require_root};

#[test]
fn amm_dask_on_real_dask() {
    if !require_root("amm_dask_on_real_dask") {
        return;
    }
    let py = python::find().unwrap_or_else(|e| panic!("{e:#}"));
    let root = python::workspace_root();
    let status = Command::new(&py)
        .args(["-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider"])
        .arg(root.join("worker/dask/tests"))
        .current_dir(&root)
        .env("AMM_AGENT_BIN", bin("amm-agent"))
        .env("AMM_WORKER_BIN", bin("amm-worker"))
        .env("AMM_BPF_OBJECT", bpf_object())
        .env("PYTHONUNBUFFERED", "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    // pytest exits 5 when it collected no test: that is a failure too
    assert!(
        status.success(),
        "amm_dask's tests failed ({status}); their output is above"
    );
}
