//! The spill directory against hostile neighbours (issue 9 items 3 and 4):
//! a symbolic link planted at its path, a directory another user owns or
//! made too open, a planted `lock` (a link, a FIFO), a FIFO `lock` in a
//! sibling `amm-spill-*` directory, spilled values replaced by a FIFO or a
//! link, and the modes of what the worker creates. The cross-user cases
//! run as root and make (and remove) their own user.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use amm_worker::spill::{SpillBuffer, SpillDir, SpillError, SpillOptions, Value, WriteOptions};
use common::*;

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
}

/// A user made for one test, removed on drop.
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn new(tag: &str) -> TestUser {
        let name = format!("ammt{tag}{}", std::process::id() % 100_000);
        let _ = std::process::Command::new("userdel")
            .arg(&name)
            .stderr(Stdio::null())
            .status();
        let st = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name} failed");
        let out = std::process::Command::new("id")
            .args(["-u", &name])
            .output()
            .expect("id");
        let uid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("uid");
        TestUser { name, uid }
    }

    fn chown(&self, p: &Path) {
        std::os::unix::fs::lchown(p, Some(self.uid), Some(self.uid)).expect("chown");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg(&self.name)
            .status();
    }
}

fn buffer(dir: SpillDir) -> SpillBuffer {
    SpillBuffer::new(
        dir,
        SpillOptions {
            target: None,
            max_spill: None,
            write: WriteOptions {
                fsync: false,
                drop_cache: true,
            },
        },
    )
}

#[test]
fn a_symlink_at_the_spill_path_is_refused_and_its_target_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).expect("mkdir");
    std::fs::write(victim.join("precious"), b"keep me").expect("write");
    let local = tmp.path().join("local");
    std::fs::create_dir(&local).expect("mkdir");
    symlink(&victim, local.join("amm-spill-w")).expect("symlink");

    let e = SpillDir::open(&local, "w").expect_err("a link must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains("symbolic link") && msg.contains("remove the link"),
        "{msg}"
    );
    assert!(
        victim.join("precious").exists(),
        "the link's target was emptied"
    );
    assert!(
        !victim.join("lock").exists(),
        "a lock was made through the link"
    );

    // The binary says so once and the nanny does not retry it as a crash.
    let s = Scratch::new();
    let w = s.workload(
        "t",
        "[[phase]]\n[[phase.op]]\nop = \"sleep\"\nduration = \"1ms\"\n",
    );
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("run")
        .arg(&w)
        .args(["--name", "w", "--max-restarts", "3", "--local-directory"])
        .arg(&local)
        .env_remove("AMM_ALLOCATOR")
        .stdin(Stdio::null());
    let r = run(cmd);
    assert_eq!(r.code, Some(78), "{}", r.describe());
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert!(!r.stderr.contains("os error 17"), "{}", r.stderr);
    assert_eq!(r.summary()["restarts"], 0, "{}", r.describe());
    assert_eq!(r.summary()["crashes"], 0, "{}", r.describe());
    assert!(victim.join("precious").exists());
}

#[test]
fn directories_and_files_are_private_to_the_worker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let b = buffer(SpillDir::open(tmp.path(), "modes").expect("open"));
    b.put("k", Value::bytes(vec![1; 4096]));
    b.evict().expect("evict");
    let file = b.file_of("k").expect("spilled");
    assert_eq!(mode(b.dir()), 0o700, "spill directory mode");
    assert_eq!(mode(&file), 0o600, "spill file mode");
    assert_eq!(mode(&b.dir().join("lock")), 0o600, "lock mode");

    // A directory of this uid that others could read or write is refused.
    let open = tmp.path().join("amm-spill-open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(open.join("0001.spill"), b"x").expect("write");
    let e = SpillDir::open(tmp.path(), "open").expect_err("0755 must be refused");
    assert!(e.to_string().contains("mode is 0755"), "{e}");
    assert!(
        open.join("0001.spill").exists(),
        "emptied a refused directory"
    );
}

#[test]
fn planted_locks_and_values_are_never_followed_or_opened() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    std::fs::write(&outside, b"do not touch").expect("write");
    let d = tmp.path().join("amm-spill-lk");
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    // `lock` as a link: refused, and the link's target is untouched.
    symlink(&outside, d.join("lock")).expect("symlink");
    let e = SpillDir::open(tmp.path(), "lk").expect_err("link lock");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&outside).expect("read"), b"do not touch");

    // `lock` as a FIFO: refused at once, not a hang.
    std::fs::remove_file(d.join("lock")).expect("rm");
    mkfifo(&d.join("lock"));
    let e = SpillDir::open(tmp.path(), "lk").expect_err("fifo lock");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_file(d.join("lock")).expect("rm");

    // A spilled value replaced by a FIFO or a link: an error, no hang, and
    // the link's target is not read.
    let b = buffer(SpillDir::open(tmp.path(), "lk").expect("open"));
    for (key, plant) in [("fifo", 0), ("link", 1)] {
        b.put(key, Value::bytes(vec![7; 4096]));
        b.evict().expect("evict");
        let f = b.file_of(key).expect("file");
        std::fs::remove_file(&f).expect("rm");
        if plant == 0 {
            mkfifo(&f);
        } else {
            symlink(&outside, &f).expect("symlink");
        }
        match b.get(key) {
            Err(SpillError::Io { key: k, source, .. }) => {
                assert_eq!(k, key);
                let s = source.to_string();
                assert!(
                    s.contains("not a regular file") || s.contains("symbolic link"),
                    "{s}"
                );
            }
            other => panic!("{key}: expected an I/O error, got {other:?}"),
        }
    }
    // Removing them removes the planted entries, never the link's target.
    assert!(b.delete("link") && b.delete("fifo"));
    assert_eq!(std::fs::read(&outside).expect("read"), b"do not touch");
}

#[test]
fn a_fifo_lock_in_a_sibling_does_not_hang_any_worker() {
    let s = Scratch::new();
    let local = s.path("spill");
    let stale = local.join("amm-spill-trap");
    std::fs::create_dir_all(&stale).expect("mkdir");
    mkfifo(&stale.join("lock"));
    let w = s.workload(
        "t",
        "[[phase]]\n[[phase.op]]\nop = \"sleep\"\nduration = \"1ms\"\n",
    );
    let mut child = worker_cmd(&s, &w, &["--no-nanny", "--name", "victim"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Not a timing assertion: a bound so a hang fails instead of blocking
    // the suite for ever (on 473be8f the sweep blocks in open(2)).
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("the worker hung on a FIFO named lock in a sibling directory");
    assert!(status.success(), "{status:?}");
    assert!(stale.join("lock").exists(), "the FIFO should be left alone");
}

#[test]
fn another_users_directory_is_refused_and_their_stale_one_left_alone() {
    if !require_root("another_users_directory_is_refused_and_their_stale_one_left_alone") {
        return;
    }
    let user = TestUser::new("sd");
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    // The user made the directory root's worker will use, open to all, with
    // a `lock` that points at a file of root's.
    let root_file = tmp.path().join("root-file");
    std::fs::write(&root_file, b"root's").expect("write");
    let d = tmp.path().join("amm-spill-rootw");
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    symlink(&root_file, d.join("lock")).expect("symlink");
    user.chown(&d.join("lock"));
    user.chown(&d);
    let e = SpillDir::open(tmp.path(), "rootw").expect_err("must refuse");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("belongs to uid {}", user.uid)) && msg.contains("remove it"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&root_file).expect("read"), b"root's");
    // Even mode 0700: the user could still read, replace or delete values.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(SpillDir::open(tmp.path(), "rootw").is_err());

    // The user's own stale spill directory is not root's to sweep.
    let theirs = tmp.path().join("amm-spill-theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::write(theirs.join("lock"), b"").expect("lock");
    std::fs::write(theirs.join("0001.spill"), b"x").expect("value");
    for p in [
        theirs.join("lock"),
        theirs.join("0001.spill"),
        theirs.clone(),
    ] {
        user.chown(&p);
    }
    let ok = SpillDir::open(tmp.path(), "fine").expect("a fresh name works");
    assert!(
        theirs.join("0001.spill").exists(),
        "root swept another user's files"
    );
    drop(ok);
}
