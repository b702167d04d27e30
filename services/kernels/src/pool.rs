/*!
Work spread over the engine's one set of worker threads: this crate's own
pool ([`Pool`]: `CANDLE_NUM_THREADS` threads counting the caller), or rayon's
current pool with `SOVEREIGN_KERNELS_POOL=rayon` (see [`use_rayon`]).

The pool hands out chunks of a call's work from a shared cursor and the
caller works too; a call returns as soon as every chunk is done, not when
every worker has checked in. So a worker that another process keeps off its
core costs at most the chunk it already holds, where a barrier pool (candle's,
which these kernels used before) made every call wait for it: with a busy
second core that cut 2-thread decode to a third of 1-thread decode. And when
a call did wait more than a millisecond for a worker's chunk, the next 100 ms
of calls run on the caller alone, so a node whose second core is taken runs
at about its 1-thread speed instead of stalling on every preemption.
*/

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Calls `work` on disjoint ranges covering `0..n`, on the worker pool.
/// `cost` is a rough count of operations: small jobs stay on this thread.
pub(crate) fn par_ranges<F: Fn(Range<usize>) + Sync>(n: usize, cost: usize, work: F) {
    if n == 0 {
        return;
    }
    if cost < 32 * 1024 || n == 1 {
        work(0..n);
        return;
    }
    if !use_rayon() {
        Pool::global().run(n, &work);
        return;
    }
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        work(0..n);
        return;
    }
    let chunk = n.div_ceil(threads * 4).max(1);
    use rayon::prelude::*;
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| work(c * chunk..n.min((c + 1) * chunk)));
}

/// One call's work: chunks of `0..n` taken from `cursor`.
struct Job {
    n: usize,
    chunk: usize,
    cursor: AtomicUsize,
    /// Items whose chunk has finished.
    done: AtomicUsize,
    /// Whether a chunk panicked (the caller panics once every chunk is over).
    panicked: std::sync::atomic::AtomicBool,
    /// The caller's closure. Only called for a chunk taken from `cursor`
    /// below `n`, and the caller returns only after every such chunk is
    /// done, so it is alive whenever it is called (a worker that comes late
    /// finds the cursor past `n` and never touches it).
    work: *const (dyn Fn(Range<usize>) + Sync),
}

// SAFETY: `work` points to a `Sync` closure and is only called while the
// caller that owns it waits (see `Job::work`); the counters are atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Takes and runs chunks until none is left.
    fn help(&self) {
        loop {
            let start = self.cursor.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n {
                return;
            }
            let end = self.n.min(start + self.chunk);
            // SAFETY: a chunk below `n` was taken, so the caller is still
            // waiting for it and the closure is alive (see `Job::work`). A
            // panic is caught so that the caller, even when it is the one
            // that panicked, only unwinds after every chunk is over.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (*self.work)(start..end)
            }));
            if ran.is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(end - start, Ordering::Release);
        }
    }
}

/// Persistent worker threads that help the calling thread with one job at a time.
struct Pool {
    workers: usize,
    /// Bumped for every new job; workers spin on it briefly before sleeping.
    generation: AtomicU64,
    current: Mutex<(u64, Option<Arc<Job>>)>,
    wake: Condvar,
    /// One call at a time: concurrent callers queue here.
    calls: Mutex<()>,
    /// When the pool was made: the clock of `solo_until`.
    epoch: Instant,
    /// Until this many nanoseconds after `epoch`, calls run on the caller
    /// alone: a worker kept the last call waiting, so its core is taken.
    solo_until: AtomicU64,
}

/// A wait this long for a worker's last chunk means its core is taken by
/// another process (a chunk takes microseconds).
const STRAGGLER: Duration = Duration::from_millis(1);
/// How long calls then run on the caller alone before the workers are tried again.
const SOLO: Duration = Duration::from_millis(100);

/// Clears this thread's [`IN_POOL`] mark when a call ends (also on unwinding).
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        IN_POOL.with(|f| f.set(false));
    }
}

thread_local! {
    /// Set on the pool's workers and on a caller during its call: a nested
    /// call runs inline.
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Pool {
    /// The process's pool, sized on first use from `CANDLE_NUM_THREADS` (then
    /// `RAYON_NUM_THREADS`, then the cores this process may use).
    fn global() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
                .iter()
                .find_map(|v| {
                    std::env::var(v)
                        .ok()?
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                })
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                workers: threads - 1,
                generation: AtomicU64::new(0),
                current: Mutex::new((0, None)),
                wake: Condvar::new(),
                calls: Mutex::new(()),
                epoch: Instant::now(),
                solo_until: AtomicU64::new(0),
            }));
            for i in 0..pool.workers {
                let spawned = std::thread::Builder::new()
                    .name(format!("kernels-{i}"))
                    .spawn(move || pool.worker());
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "kernel worker thread not started");
                }
            }
            pool
        })
    }

    fn worker(&self) {
        IN_POOL.with(|f| f.set(true));
        let mut seen = 0u64;
        loop {
            // Spin a little: steps come back to back while a model runs.
            for _ in 0..20_000 {
                if self.generation.load(Ordering::Acquire) != seen {
                    break;
                }
                std::hint::spin_loop();
            }
            let job = {
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                while current.0 == seen {
                    current = self.wake.wait(current).unwrap_or_else(|e| e.into_inner());
                }
                seen = current.0;
                current.1.clone()
            };
            if let Some(job) = job {
                job.help();
            }
        }
    }

    /// Runs `work` over `0..n` with the workers' help; returns when every
    /// chunk is done.
    fn run(&self, n: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        if self.workers == 0
            || IN_POOL.with(|f| f.get())
            || now < self.solo_until.load(Ordering::Relaxed)
        {
            work(0..n);
            return;
        }
        let _one_at_a_time = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        // A call made by `work` itself (on this thread) runs inline.
        IN_POOL.with(|f| f.set(true));
        let _reset = Reset;
        // About 8 chunks per thread: a straggler holds back little.
        let chunk = n.div_ceil((self.workers + 1) * 8).max(1);
        // SAFETY: only the lifetime is erased; `Job::work` says why the
        // pointer is never used after this call returns.
        let work: *const (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(work) };
        let job = Arc::new(Job {
            n,
            chunk,
            cursor: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: std::sync::atomic::AtomicBool::new(false),
            work,
        });
        {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            current.0 += 1;
            current.1 = Some(Arc::clone(&job));
            self.generation.store(current.0, Ordering::Release);
        }
        self.wake.notify_all();
        job.help();
        let waiting = Instant::now();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < n {
            // A worker holds the last chunks: wait for it, yielding the core
            // if it takes long (it may be waiting for this one).
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if waiting.elapsed() > STRAGGLER {
            let until = self.epoch.elapsed() + SOLO;
            self.solo_until
                .store(until.as_nanos() as u64, Ordering::Relaxed);
        }
        {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            current.1 = None;
        }
        assert!(
            !job.panicked.load(Ordering::Relaxed),
            "a kernel chunk panicked"
        );
    }
}

/// Splits `out` into pieces of `len` values and calls `work(i, piece)` for
/// every piece `i`, on the worker pool; `cost` as in [`par_ranges`].
///
/// # Panics
/// If `len` is zero or does not divide `out.len()`.
pub fn par_chunks_mut<F: Fn(usize, &mut [f32]) + Sync>(
    out: &mut [f32],
    len: usize,
    cost: usize,
    work: F,
) {
    assert!(
        len > 0 && out.len().is_multiple_of(len),
        "pieces must divide the output"
    );
    let n = out.len() / len;
    let base = SharedOut(out.as_mut_ptr());
    par_ranges(n, cost, |range| {
        let base = &base;
        for i in range {
            // SAFETY: `i < n` so `i * len + len <= out.len()`; each `i` belongs to
            // exactly one range handed out by the pool, so the pieces given to
            // different workers never overlap; `out` is borrowed mutably for the
            // whole call, which returns only after every worker finished.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(i * len), len) };
            work(i, piece);
        }
    });
}

/// Whether `SOVEREIGN_KERNELS_POOL=rayon` asks for rayon's pool (the current
/// one, so `ThreadPool::install` sets the thread count) instead of [`Pool`].
fn use_rayon() -> bool {
    static RAYON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RAYON.get_or_init(|| std::env::var("SOVEREIGN_KERNELS_POOL").is_ok_and(|v| v == "rayon"))
}

/// The output pointer shared by the pool's workers, which write disjoint elements.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the pointer is only used for writes to disjoint elements (see
// `par_chunks_mut` and `par_rows`).
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index of `0..n` is visited exactly once, for sizes around the
    /// chunking's edges, from several callers at once, with nested calls.
    #[test]
    fn every_item_runs_exactly_once() {
        let callers: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    for n in [1usize, 2, 7, 16, 17, 100, 1000, 4099] {
                        let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        par_ranges(n, usize::MAX, |r| {
                            for i in r {
                                seen[i].fetch_add(1, Ordering::Relaxed);
                                // A nested call from inside the work runs inline.
                                let inner = AtomicUsize::new(0);
                                par_ranges(3, usize::MAX, |r| {
                                    inner.fetch_add(r.len(), Ordering::Relaxed);
                                });
                                assert_eq!(inner.load(Ordering::Relaxed), 3);
                            }
                        });
                        assert!(
                            seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                            "n = {n}"
                        );
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    /// A panic in any chunk reaches the caller after every chunk is over,
    /// and the pool keeps working afterwards.
    #[test]
    fn a_panicking_chunk_panics_the_caller_and_leaves_the_pool_usable() {
        let caught = std::panic::catch_unwind(|| {
            par_ranges(1000, usize::MAX, |r| {
                assert!(!r.contains(&500), "chunk with 500")
            });
        });
        assert!(caught.is_err());
        let total = AtomicUsize::new(0);
        par_ranges(1000, usize::MAX, |r| {
            total.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 1000);
    }
}
