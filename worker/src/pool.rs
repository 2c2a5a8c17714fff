//! The task threads: `--nthreads` threads take tasks from the queued
//! batches, round-robin between batches (so concurrent operations of a phase
//! share the threads fairly) and in order within a batch; each thread passes
//! the pause [`Gate`] before it starts a task, so a paused worker starts
//! nothing new while running tasks finish.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::memory::Gate;

/// A unit of work. Its error fails the batch it belongs to.
pub type Task = Box<dyn FnOnce() -> anyhow::Result<()> + Send + 'static>;

struct Batch {
    remaining: Mutex<(usize, Vec<String>)>,
    done: Condvar,
}

/// Batches with their queued tasks, and whether the pool is shutting down.
type Jobs = (VecDeque<(Arc<Batch>, VecDeque<Task>)>, bool);

struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// A fixed set of task threads.
pub struct Pool {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

/// Most task threads a worker runs: far more than any machine has cores
/// (Dask's default is one per core), and few enough that the stacks and
/// signal stacks of all of them can be had.
pub const MAX_THREADS: usize = 1024;

impl Pool {
    /// Starts `n` threads (at least one, at most [`MAX_THREADS`]). If one
    /// cannot be started, those already running are stopped and the error
    /// is returned.
    pub fn new(n: usize, gate: Arc<Gate>) -> std::io::Result<Pool> {
        if n > MAX_THREADS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{n} task threads asked for; at most {MAX_THREADS}"),
            ));
        }
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        // Dropping `pool` on an early return stops the threads already made.
        let mut pool = Pool {
            queue,
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let q = pool.queue.clone();
            let g = gate.clone();
            pool.threads.push(
                std::thread::Builder::new()
                    .name(format!("amm-task-{i}"))
                    .spawn(move || worker_loop(&q, &g))?,
            );
        }
        Ok(pool)
    }

    /// Queues `tasks` and waits until all have run; returns the errors.
    pub fn run_all(&self, tasks: Vec<Task>) -> Vec<String> {
        if tasks.is_empty() {
            return Vec::new();
        }
        let batch = Arc::new(Batch {
            remaining: Mutex::new((tasks.len(), Vec::new())),
            done: Condvar::new(),
        });
        {
            let mut jobs = self.queue.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.0.push_back((batch.clone(), tasks.into()));
        }
        self.queue.ready.notify_all();
        let mut r = batch.remaining.lock().unwrap_or_else(|e| e.into_inner());
        while r.0 > 0 {
            r = batch.done.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut r.1)
    }
}

fn worker_loop(q: &Queue, gate: &Gate) {
    loop {
        let (task, batch) = {
            let mut jobs = q.jobs.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some((batch, mut queue)) = jobs.0.pop_front()
                    && let Some(task) = queue.pop_front()
                {
                    if !queue.is_empty() {
                        jobs.0.push_back((batch.clone(), queue));
                    }
                    break (task, batch);
                }
                if jobs.1 {
                    return;
                }
                jobs = q.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A gate that gave up (spilling failed for too long while paused)
        // fails the task instead of starting it.
        let err = match gate.wait_to_start() {
            Err(why) => Some(why),
            Ok(()) => {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
                gate.finished();
                match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("task panicked".to_string()),
                }
            }
        };
        let mut r = batch.remaining.lock().unwrap_or_else(|e| e.into_inner());
        r.0 -= 1;
        if let Some(e) = err {
            r.1.push(e);
        }
        if r.0 == 0 {
            batch.done.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut jobs = self.queue.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.1 = true;
        }
        self.queue.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_task_and_collects_errors() {
        let gate = Arc::new(Gate::default());
        let pool = Pool::new(2, gate.clone()).expect("pool");
        let n = Arc::new(AtomicUsize::new(0));
        let mut tasks: Vec<Task> = Vec::new();
        for i in 0..10 {
            let n = n.clone();
            tasks.push(Box::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
                if i == 3 {
                    anyhow::bail!("task 3 failed");
                }
                Ok(())
            }));
        }
        let errors = pool.run_all(tasks);
        assert_eq!(n.load(Ordering::SeqCst), 10);
        assert_eq!(errors, vec!["task 3 failed".to_string()]);
        assert_eq!(gate.started(), 10);
        assert_eq!(gate.finished_count(), 10);
    }
}
