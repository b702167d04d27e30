/*!
Work spread over the engine's one set of worker threads: candle's barrier
pool (the pool candle's own CPU ops use), or rayon's current pool with
`SOVEREIGN_KERNELS_POOL=rayon` (see [`use_rayon`]).
*/

use std::ops::Range;

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
        candle_core::utils::barrier_pool().execute_chunked(n, work);
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
/// one, so `ThreadPool::install` sets the thread count) instead of candle's.
/// candle's barrier pool has the lower overhead on a quiet machine, but every
/// call waits until each of its workers has run, which costs a scheduler time
/// slice when another process holds a core; rayon's workers only take work
/// when they run.
fn use_rayon() -> bool {
    static RAYON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RAYON.get_or_init(|| std::env::var("SOVEREIGN_KERNELS_POOL").is_ok_and(|v| v == "rayon"))
}

/// The output pointer shared by the pool's workers, which write disjoint elements.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the pointer is only used for writes to disjoint elements (see
// `par_chunks_mut` and `par_rows`).
unsafe impl Sync for SharedOut {}
