//! SpillBuffer: the worker's managed data, keys to values, moving least
//! recently used values to disk and back.
//!
//! * `put` stores a value in memory; if managed memory is then above the
//!   target, the calling thread spills at most one value (bounded blocking)
//!   and asks the memory manager to spill the rest.
//! * `evict` spills the least recently used value (the memory manager calls
//!   it when process memory passes the spill threshold). A value being
//!   written stays readable: no task ever waits for a write.
//! * `get` returns a value, reading it back if spilled. Before reading, it
//!   makes room by spilling other values until the value fits under the
//!   target: asking for more spilled data than fits brings values back one
//!   at a time instead of all at once. The file is kept as a clean copy, so
//!   spilling that value again costs no I/O.
//! * Disk full, `max-spill` and I/O errors make an eviction fail cleanly:
//!   the value stays in memory, nothing is lost, the error is returned.
//!
//! The file format is in [`format`]; the directory's life cycle in [`dir`].

pub mod dir;
pub mod format;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use nix::errno::Errno;

pub use dir::SpillDir;
pub use format::WriteOptions;

/// One typed array of a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Bytes.
    U8(Vec<u8>),
    /// 32-bit integers (e.g. CSR column indices).
    U32(Vec<u32>),
    /// 64-bit integers (e.g. CSR row pointers).
    U64(Vec<u64>),
    /// Doubles (matrix blocks).
    F64(Vec<f64>),
}

impl Part {
    /// The on-disk type code.
    pub fn dtype(&self) -> u32 {
        match self {
            Part::U8(_) => 1,
            Part::U32(_) => 2,
            Part::U64(_) => 3,
            Part::F64(_) => 4,
        }
    }

    /// Size of one element of type `dtype`.
    pub fn elem_size(dtype: u32) -> Option<u64> {
        match dtype {
            1 => Some(1),
            2 => Some(4),
            3 | 4 => Some(8),
            _ => None,
        }
    }

    /// A zero-filled part of `len` elements.
    pub fn zeroed(dtype: u32, len: usize) -> Option<Part> {
        Some(match dtype {
            1 => Part::U8(vec![0; len]),
            2 => Part::U32(vec![0; len]),
            3 => Part::U64(vec![0; len]),
            4 => Part::F64(vec![0.0; len]),
            _ => return None,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Part::U8(v) => v.len(),
            Part::U32(v) => v.len(),
            Part::U64(v) => v.len(),
            Part::F64(v) => v.len(),
        }
    }

    /// True when the part has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Part::U8(v) => v,
            Part::U32(v) => bytemuck::cast_slice(v),
            Part::U64(v) => bytemuck::cast_slice(v),
            Part::F64(v) => bytemuck::cast_slice(v),
        }
    }

    /// The elements as mutable bytes (every bit pattern is a valid element).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Part::U8(v) => v,
            Part::U32(v) => bytemuck::cast_slice_mut(v),
            Part::U64(v) => bytemuck::cast_slice_mut(v),
            Part::F64(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// A managed value: a few typed arrays plus four numbers of metadata
/// (shapes) that travel with it to disk.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Value {
    /// Owner-defined numbers (e.g. rows, columns).
    pub meta: [u64; 4],
    /// The arrays.
    pub parts: Vec<Part>,
}

impl Value {
    /// A value made of one byte buffer.
    pub fn bytes(data: Vec<u8>) -> Value {
        Value {
            meta: [0; 4],
            parts: vec![Part::U8(data)],
        }
    }

    /// The value's `sizeof`: bytes of its arrays plus the struct itself.
    pub fn sizeof(&self) -> u64 {
        let payload: u64 = self.parts.iter().map(|p| p.as_bytes().len() as u64).sum();
        payload + (size_of::<Value>() + self.parts.len() * size_of::<Part>()) as u64
    }

    /// Payload bytes (what the file's payload holds).
    pub fn payload_len(&self) -> u64 {
        self.parts.iter().map(|p| p.as_bytes().len() as u64).sum()
    }
}

/// Everything that can go wrong with a spilled value; every variant names
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The key is not in the buffer.
    #[error("no value stored under key {0:?}")]
    NoSuchKey(String),
    /// The value's file is gone.
    #[error("spilled value of key {key:?} is missing: {path} does not exist")]
    Missing {
        /// The key.
        key: String,
        /// Its file.
        path: String,
    },
    /// The file does not hold what its header promises.
    #[error("spilled value of key {key:?} is corrupt ({path}): {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Its file.
        path: String,
        /// What check failed.
        reason: String,
    },
    /// The file is shorter than its header says.
    #[error("spilled value of key {key:?} is truncated ({path}): {reason}")]
    Truncated {
        /// The key.
        key: String,
        /// Its file.
        path: String,
        /// How short.
        reason: String,
    },
    /// No space left on the spill device.
    #[error("cannot spill key {key:?}: no space left in {dir}")]
    DiskFull {
        /// The key that could not be written (it stays in memory).
        key: String,
        /// The spill directory.
        dir: String,
    },
    /// Spilling would pass `max-spill`.
    #[error(
        "cannot spill key {key:?}: max-spill is {max} bytes, {used} are used and the value needs {needed}"
    )]
    MaxSpill {
        /// The key (it stays in memory).
        key: String,
        /// The configured maximum.
        max: u64,
        /// Bytes on disk now.
        used: u64,
        /// Bytes the value would take.
        needed: u64,
    },
    /// Any other I/O error.
    #[error("I/O error on spilled value of key {key:?} ({path}): {source}")]
    Io {
        /// The key.
        key: String,
        /// Its file.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// Counters and gauges of the buffer (the timeline contract's type: each
/// tick carries them).
pub use amm_timeline::SpillStats;

#[derive(Debug, Clone)]
struct DiskFile {
    /// Its name in the spill directory.
    name: String,
    bytes: u64,
}

#[derive(Debug)]
enum Slot {
    Memory {
        value: Arc<Value>,
        file: Option<DiskFile>,
    },
    Writing {
        value: Arc<Value>,
    },
    Disk {
        file: DiskFile,
    },
    Reading {
        file: DiskFile,
    },
}

#[derive(Debug)]
struct Entry {
    id: u64,
    size: u64,
    tick: u64,
    slot: Slot,
}

/// What [`SpillBuffer::evict`] took off the LRU.
enum Pick {
    /// Nothing in memory to spill.
    Nothing,
    /// A clean copy was on disk: this many bytes left memory.
    Dropped(u64),
    /// A value to write (its slot is `Writing`).
    Write(ToWrite),
}

/// A value on its way to disk.
struct ToWrite {
    key: String,
    /// The entry's id: the write is void if the key was replaced meanwhile.
    id: u64,
    value: Arc<Value>,
    size: u64,
    /// Its file's name in the spill directory.
    name: String,
}

/// What [`SpillBuffer::get`] found under the lock.
enum Found {
    /// In memory (or being written): no read.
    Ready(Arc<Value>),
    /// On disk: read it (its slot is `Reading`).
    OnDisk(ToRead),
}

/// A value on its way back from disk.
struct ToRead {
    file: DiskFile,
    size: u64,
    /// The entry's id: the read is void if the key was replaced meanwhile.
    id: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// In-memory values that may be evicted, oldest first.
    lru: BTreeMap<u64, String>,
    clock: u64,
    next_id: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

#[derive(Debug, Default)]
struct Counters {
    managed: AtomicU64,
    spilled: AtomicU64,
    disk: AtomicU64,
    keys: AtomicU64,
    spill_count: AtomicU64,
    spilled_bytes_total: AtomicU64,
    written_bytes_total: AtomicU64,
    unspill_count: AtomicU64,
    unspilled_bytes_total: AtomicU64,
    spill_failures: AtomicU64,
    write_us: AtomicU64,
    read_us: AtomicU64,
}

/// Options of a [`SpillBuffer`].
#[derive(Debug, Clone, Copy)]
pub struct SpillOptions {
    /// Managed bytes above which values are spilled (`None`: only on demand).
    pub target: Option<u64>,
    /// Most bytes the directory may hold.
    pub max_spill: Option<u64>,
    /// How files are written.
    pub write: WriteOptions,
}

/// Called (from a task thread) when a `put` left managed memory above the
/// target: the memory manager's wake-up.
pub type PressureHook = Box<dyn Fn() + Send + Sync>;

/// The managed data store.
pub struct SpillBuffer {
    dir: SpillDir,
    dir_path: PathBuf,
    state: Mutex<State>,
    read_done: Condvar,
    counters: Counters,
    target: AtomicU64,
    opts: SpillOptions,
    on_pressure: OnceLock<PressureHook>,
    /// Set by the memory manager while spilling fails: `put` then leaves
    /// values in memory instead of trying the disk on every call.
    spill_blocked: AtomicBool,
}

impl std::fmt::Debug for SpillBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillBuffer")
            .field("dir", &self.dir_path)
            .field("stats", &self.stats())
            .finish()
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl SpillBuffer {
    /// A buffer spilling into `dir`.
    pub fn new(dir: SpillDir, opts: SpillOptions) -> SpillBuffer {
        let dir_path = dir.path().to_path_buf();
        SpillBuffer {
            dir,
            dir_path,
            state: Mutex::new(State::default()),
            read_done: Condvar::new(),
            counters: Counters::default(),
            target: AtomicU64::new(opts.target.unwrap_or(u64::MAX)),
            opts,
            on_pressure: OnceLock::new(),
            spill_blocked: AtomicBool::new(false),
        }
    }

    /// Sets the hook `put` calls when managed memory stays above target.
    pub fn set_pressure_hook(&self, hook: PressureHook) {
        let _ = self.on_pressure.set(hook);
    }

    /// The spill directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir_path
    }

    /// Free bytes on the spill directory's file system, if it can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        self.dir.free_bytes().ok()
    }

    /// While `true`, `put` does not try to spill (the memory manager
    /// retries with back-off instead).
    pub fn set_spill_blocked(&self, blocked: bool) {
        self.spill_blocked.store(blocked, Ordering::Relaxed);
    }

    /// The managed-memory target in bytes (`None`: no target).
    pub fn target(&self) -> Option<u64> {
        match self.target.load(Ordering::Relaxed) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state
        // (every mutation is completed before any call that can panic).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of values in memory (lock-free).
    pub fn managed(&self) -> u64 {
        self.counters.managed.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters (lock-free).
    pub fn stats(&self) -> SpillStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpillStats {
            managed: l(&c.managed),
            spilled: l(&c.spilled),
            disk: l(&c.disk),
            keys: l(&c.keys),
            spill_count: l(&c.spill_count),
            spilled_bytes_total: l(&c.spilled_bytes_total),
            written_bytes_total: l(&c.written_bytes_total),
            unspill_count: l(&c.unspill_count),
            unspilled_bytes_total: l(&c.unspilled_bytes_total),
            spill_failures: l(&c.spill_failures),
            write_us: l(&c.write_us),
            read_us: l(&c.read_us),
        }
    }

    /// Stores `value` under `key` (replacing any previous value). If managed
    /// memory is then above target, spills at most one value on this thread
    /// and wakes the memory manager for the rest.
    pub fn put(&self, key: &str, value: Value) {
        let size = value.sizeof();
        {
            let mut st = self.lock();
            if let Some(old) = st.entries.remove(key) {
                self.release(&mut st, old);
            }
            let tick = st.tick();
            st.next_id += 1;
            let id = st.next_id;
            st.entries.insert(
                key.to_string(),
                Entry {
                    id,
                    size,
                    tick,
                    slot: Slot::Memory {
                        value: Arc::new(value),
                        file: None,
                    },
                },
            );
            st.lru.insert(tick, key.to_string());
            self.counters.managed.fetch_add(size, Ordering::Relaxed);
            self.counters.keys.fetch_add(1, Ordering::Relaxed);
        }
        let target = self.target.load(Ordering::Relaxed);
        if self.managed() > target {
            if self.spill_blocked.load(Ordering::Relaxed) {
                // the manager retries with back-off
            } else if let Err(e) = self.evict() {
                tracing::debug!("spill on put failed: {e}");
            }
            if self.managed() > target
                && let Some(hook) = self.on_pressure.get()
            {
                hook();
            }
        }
    }

    /// Drops the accounting and file of an entry removed from the map.
    fn release(&self, st: &mut State, e: Entry) {
        let c = &self.counters;
        c.keys.fetch_sub(1, Ordering::Relaxed);
        let remove_file = |f: &DiskFile| {
            let _ = self.dir.remove(&f.name);
            c.disk.fetch_sub(f.bytes, Ordering::Relaxed);
        };
        match e.slot {
            Slot::Memory { file, .. } => {
                st.lru.remove(&e.tick);
                c.managed.fetch_sub(e.size, Ordering::Relaxed);
                if let Some(f) = &file {
                    remove_file(f);
                }
            }
            // The writer finds the entry gone and removes its own file.
            Slot::Writing { .. } => {
                c.managed.fetch_sub(e.size, Ordering::Relaxed);
            }
            Slot::Disk { file } | Slot::Reading { file } => {
                c.spilled.fetch_sub(e.size, Ordering::Relaxed);
                remove_file(&file);
            }
        }
    }

    /// Removes `key`; returns whether it was there.
    pub fn delete(&self, key: &str) -> bool {
        let mut st = self.lock();
        match st.entries.remove(key) {
            Some(e) => {
                self.release(&mut st, e);
                true
            }
            None => false,
        }
    }

    /// Keys starting with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let st = self.lock();
        let mut k: Vec<String> = st
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// Whether `key` is in memory right now (false if spilled or absent).
    pub fn in_memory(&self, key: &str) -> bool {
        let st = self.lock();
        matches!(
            st.entries.get(key).map(|e| &e.slot),
            Some(Slot::Memory { .. } | Slot::Writing { .. })
        )
    }

    /// The file holding `key`'s spilled bytes, if any.
    pub fn file_of(&self, key: &str) -> Option<PathBuf> {
        let st = self.lock();
        match &st.entries.get(key)?.slot {
            Slot::Memory { file, .. } => file.as_ref().map(|f| self.dir_path.join(&f.name)),
            Slot::Writing { .. } => None,
            Slot::Disk { file } | Slot::Reading { file } => Some(self.dir_path.join(&file.name)),
        }
    }

    /// Spills the least recently used value in memory. `Ok(Some(bytes))`:
    /// that many managed bytes left memory; `Ok(None)`: nothing to spill;
    /// `Err`: the value stays in memory and the error says why.
    pub fn evict(&self) -> Result<Option<u64>, SpillError> {
        let w = match self.pick_to_spill()? {
            Pick::Nothing => return Ok(None),
            Pick::Dropped(size) => return Ok(Some(size)),
            Pick::Write(w) => w,
        };
        let start = Instant::now();
        let written = self
            .dir
            .create(&w.name)
            .and_then(|mut f| format::write_value(&mut f, &w.key, &w.value, self.opts.write));
        self.counters
            .write_us
            .fetch_add(micros(start), Ordering::Relaxed);
        self.finish_write(w, written)
    }

    /// Under the lock: takes the least recently used value off the LRU and
    /// either drops it (a clean copy is on disk), refuses it (`max-spill`),
    /// or marks it `Writing` for [`Self::evict`] to write outside the lock.
    fn pick_to_spill(&self) -> Result<Pick, SpillError> {
        let mut st = self.lock();
        let Some((tick, key)) = st.lru.pop_first() else {
            return Ok(Pick::Nothing);
        };
        let disk_now = self.counters.disk.load(Ordering::Relaxed);
        st.next_id += 1;
        let file_no = st.next_id;
        let Some(entry) = st.entries.get_mut(&key) else {
            return Ok(Pick::Nothing);
        };
        let (size, id) = (entry.size, entry.id);
        let (value, clean) = match &mut entry.slot {
            Slot::Memory { value, file } => (value.clone(), file.take()),
            _ => return Ok(Pick::Nothing),
        };
        if let Some(f) = clean {
            // A clean copy is on disk: dropping the memory is enough.
            entry.slot = Slot::Disk { file: f };
            self.count_left_memory(size);
            return Ok(Pick::Dropped(size));
        }
        let needed = value.payload_len() + format::header_len(value.parts.len(), &key) as u64;
        if let Some(max) = self.opts.max_spill
            && disk_now + needed > max
        {
            st.lru.insert(tick, key.clone());
            self.counters.spill_failures.fetch_add(1, Ordering::Relaxed);
            return Err(SpillError::MaxSpill {
                key,
                max,
                used: disk_now,
                needed,
            });
        }
        if let Some(entry) = st.entries.get_mut(&key) {
            entry.slot = Slot::Writing {
                value: value.clone(),
            };
        }
        Ok(Pick::Write(ToWrite {
            key,
            id,
            value,
            size,
            name: format!("{file_no:016x}.spill"),
        }))
    }

    /// Counts `size` managed bytes that left memory for the disk.
    fn count_left_memory(&self, size: u64) {
        let c = &self.counters;
        c.managed.fetch_sub(size, Ordering::Relaxed);
        c.spilled.fetch_add(size, Ordering::Relaxed);
        c.spilled_bytes_total.fetch_add(size, Ordering::Relaxed);
    }

    /// Under the lock again: the written value's slot becomes `Disk`, or
    /// after a failed write `Memory` again (unless it was replaced or deleted
    /// meanwhile, when the file is removed).
    fn finish_write(
        &self,
        w: ToWrite,
        written: io::Result<u64>,
    ) -> Result<Option<u64>, SpillError> {
        let ToWrite {
            key,
            id,
            value,
            size,
            name,
        } = w;
        let mut st = self.lock();
        let ours = st
            .entries
            .get(&key)
            .is_some_and(|e| e.id == id && matches!(e.slot, Slot::Writing { .. }));
        match written {
            Ok(bytes) => {
                if !ours {
                    let _ = self.dir.remove(&name);
                    return Ok(Some(0));
                }
                if let Some(e) = st.entries.get_mut(&key) {
                    e.slot = Slot::Disk {
                        file: DiskFile { name, bytes },
                    };
                }
                self.count_left_memory(size);
                let c = &self.counters;
                c.disk.fetch_add(bytes, Ordering::Relaxed);
                c.spill_count.fetch_add(1, Ordering::Relaxed);
                c.written_bytes_total.fetch_add(bytes, Ordering::Relaxed);
                drop(st);
                drop(value); // frees the memory unless a task still holds it
                Ok(Some(size))
            }
            Err(err) => {
                let _ = self.dir.remove(&name);
                self.counters.spill_failures.fetch_add(1, Ordering::Relaxed);
                if ours {
                    let tick = st.tick();
                    if let Some(e) = st.entries.get_mut(&key) {
                        e.tick = tick;
                        e.slot = Slot::Memory { value, file: None };
                    }
                    st.lru.insert(tick, key.clone());
                }
                Err(self.write_error(key, &name, err))
            }
        }
    }

    /// The error of a failed write: [`SpillError::DiskFull`] when the device
    /// or the quota is full, else [`SpillError::Io`] naming the file.
    fn write_error(&self, key: String, name: &str, err: io::Error) -> SpillError {
        let full = matches!(
            err.raw_os_error().map(Errno::from_raw),
            Some(Errno::ENOSPC | Errno::EDQUOT)
        ) || err.kind() == io::ErrorKind::StorageFull;
        if full {
            SpillError::DiskFull {
                key,
                dir: self.dir_path.display().to_string(),
            }
        } else {
            SpillError::Io {
                key,
                path: self.dir_path.join(name).display().to_string(),
                source: err,
            }
        }
    }

    /// Spills LRU values until managed memory is at most `bytes`. Returns
    /// how many bytes left memory, or the first error (after which the
    /// remaining values stay in memory).
    pub fn evict_until(&self, bytes: u64) -> Result<u64, SpillError> {
        let mut freed = 0;
        while self.managed() > bytes {
            match self.evict()? {
                Some(n) => freed += n,
                None => break,
            }
        }
        Ok(freed)
    }

    /// Returns the value of `key`, reading it back from disk if needed.
    /// Before reading, other values are spilled until this one fits under
    /// the target, so reading back more than fits never piles up in memory.
    pub fn get(&self, key: &str) -> Result<Arc<Value>, SpillError> {
        let read = match self.find(key)? {
            Found::Ready(value) => return Ok(value),
            Found::OnDisk(read) => read,
        };
        self.make_room(read.size);
        let start = Instant::now();
        let result = self.read_file(&read.file, key);
        self.counters
            .read_us
            .fetch_add(micros(start), Ordering::Relaxed);
        let out = self.finish_read(key, read, result);
        self.read_done.notify_all();
        out
    }

    /// Under the lock: the value if it is in memory (now the most recently
    /// used), else its file, marked `Reading` for [`Self::get`] to read
    /// outside the lock. Waits while another thread reads the same key.
    fn find(&self, key: &str) -> Result<Found, SpillError> {
        let mut st = self.lock();
        loop {
            let Some(entry) = st.entries.get(key) else {
                return Err(SpillError::NoSuchKey(key.to_string()));
            };
            match &entry.slot {
                Slot::Memory { value, .. } => {
                    let value = value.clone();
                    let old = entry.tick;
                    let tick = st.tick();
                    if let Some(key_owned) = st.lru.remove(&old) {
                        st.lru.insert(tick, key_owned);
                    }
                    if let Some(e) = st.entries.get_mut(key) {
                        e.tick = tick;
                    }
                    return Ok(Found::Ready(value));
                }
                Slot::Writing { value } => return Ok(Found::Ready(value.clone())),
                Slot::Reading { .. } => {
                    st = self.read_done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                Slot::Disk { file } => {
                    let read = ToRead {
                        file: file.clone(),
                        size: entry.size,
                        id: entry.id,
                    };
                    if let Some(e) = st.entries.get_mut(key) {
                        e.slot = Slot::Reading {
                            file: read.file.clone(),
                        };
                    }
                    return Ok(Found::OnDisk(read));
                }
            }
        }
    }

    /// Under the lock again: a value read back is in memory with its file as
    /// a clean copy; after a failed read the bytes stay on disk.
    fn finish_read(
        &self,
        key: &str,
        read: ToRead,
        result: Result<Value, SpillError>,
    ) -> Result<Arc<Value>, SpillError> {
        let ToRead { file, size, id } = read;
        let mut st = self.lock();
        let ours = st
            .entries
            .get(key)
            .is_some_and(|e| e.id == id && matches!(e.slot, Slot::Reading { .. }));
        match result {
            Ok(value) => {
                let value = Arc::new(value);
                if ours {
                    let tick = st.tick();
                    if let Some(e) = st.entries.get_mut(key) {
                        e.tick = tick;
                        e.slot = Slot::Memory {
                            value: value.clone(),
                            file: Some(file),
                        };
                    }
                    st.lru.insert(tick, key.to_string());
                    let c = &self.counters;
                    c.managed.fetch_add(size, Ordering::Relaxed);
                    c.spilled.fetch_sub(size, Ordering::Relaxed);
                    c.unspill_count.fetch_add(1, Ordering::Relaxed);
                    c.unspilled_bytes_total.fetch_add(size, Ordering::Relaxed);
                }
                Ok(value)
            }
            Err(e) => {
                if ours && let Some(entry) = st.entries.get_mut(key) {
                    // The bytes stay where they are; a retry gives the same
                    // error rather than a crash or wrong data.
                    entry.slot = Slot::Disk { file };
                }
                Err(e)
            }
        }
    }

    /// Spills other values until `incoming` more bytes fit under the target.
    fn make_room(&self, incoming: u64) {
        let Some(target) = self.target() else {
            return;
        };
        if self.spill_blocked.load(Ordering::Relaxed) {
            return; // spilling fails: the manager retries with back-off
        }
        while self.managed() + incoming > target {
            match self.evict() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("cannot make room to read a value back: {e}");
                    break;
                }
            }
        }
    }

    /// Removes every value and file and the directory (used before a
    /// terminate's `exit`, which skips destructors).
    pub fn cleanup(&self) {
        let mut st = self.lock();
        let keys: Vec<String> = st.entries.keys().cloned().collect();
        for k in keys {
            if let Some(e) = st.entries.remove(&k) {
                self.release(&mut st, e);
            }
        }
        drop(st);
        self.dir.cleanup();
    }

    /// Reads a spilled value back, with every failure naming the key.
    fn read_file(&self, file: &DiskFile, key: &str) -> Result<Value, SpillError> {
        let path = self.dir_path.join(&file.name).display().to_string();
        let mut f = self.dir.open_file(&file.name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SpillError::Missing {
                key: key.to_string(),
                path: path.clone(),
            },
            _ => SpillError::Io {
                key: key.to_string(),
                path: path.clone(),
                source: e,
            },
        })?;
        format::read_value(&mut f, key, self.opts.write.drop_cache).map_err(|d| {
            let key = key.to_string();
            match d {
                format::Defect::Corrupt(reason) => SpillError::Corrupt { key, path, reason },
                format::Defect::Truncated(reason) => SpillError::Truncated { key, path, reason },
                format::Defect::Io(source) => SpillError::Io { key, path, source },
            }
        })
    }
}

/// A spill buffer for the crate's tests: in directory `name` under `dir`,
/// spilling past `target` (None: only when told to), writing without fsync.
#[cfg(test)]
pub(crate) fn test_buffer(
    dir: &std::path::Path,
    name: &str,
    target: Option<u64>,
    drop_cache: bool,
) -> SpillBuffer {
    SpillBuffer::new(
        SpillDir::open(dir, name).expect("dir"),
        SpillOptions {
            target,
            max_spill: None,
            write: WriteOptions {
                fsync: false,
                drop_cache,
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(target: Option<u64>) -> (tempfile::TempDir, SpillBuffer) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let b = test_buffer(tmp.path(), "unit", target, true);
        (tmp, b)
    }

    #[test]
    fn lru_order_and_clean_copies() {
        let (_t, b) = buffer(None);
        for i in 0..4u8 {
            b.put(&format!("k{i}"), Value::bytes(vec![i; 1000]));
        }
        // Touch k0 so k1 becomes the oldest.
        b.get("k0").expect("get");
        assert!(b.evict().expect("evict").is_some());
        assert!(!b.in_memory("k1") && b.in_memory("k0"));
        let v = b.get("k1").expect("unspill");
        assert_eq!(v.parts[0], Part::U8(vec![1; 1000]));
        // k1 kept its file as a clean copy: evicting it again writes nothing.
        let written = b.stats().written_bytes_total;
        for _ in 0..4 {
            b.evict().expect("evict");
        }
        assert!(!b.in_memory("k1"));
        assert_eq!(b.stats().managed, 0);
        assert!(b.stats().written_bytes_total > written);
        let after = b.stats().written_bytes_total;
        b.get("k1").expect("again");
        b.evict_until(0).expect("evict all");
        assert_eq!(b.stats().written_bytes_total, after, "clean copy rewritten");
        assert!(b.delete("k1"));
        assert!(matches!(b.get("k1"), Err(SpillError::NoSuchKey(_))));
    }

    #[test]
    fn target_spills_on_put() {
        let (_t, b) = buffer(Some(10_000));
        for i in 0..20 {
            b.put(&format!("k{i:02}"), Value::bytes(vec![7; 1000]));
        }
        let s = b.stats();
        assert!(s.managed <= 10_000 + 1100, "managed {}", s.managed);
        assert!(s.spill_count >= 9);
        assert_eq!(s.keys, 20);
    }
}
