//! rustbpe: a byte-level BPE trainer (GPT-4 style splitting) for Python, with the same interface as
//! the PyPI `rustbpe` package. Train here, then hand `get_mergeable_ranks()` to tiktoken for fast
//! inference.
//!
//! The pipeline, file by file:
//! 1. python.rs pulls documents from a Python iterator, a buffer at a time.
//! 2. `count_chunks` (here) cuts each document into chunks (split.rs) and counts the distinct
//!    chunks, one `ChunkCounts` (train.rs) per thread.
//! 3. The per-thread counts are folded into one, and `train_merges` (train.rs) learns the merges.
//! 4. Encoding applies the merges to each chunk in rank order (encode.rs), as tiktoken does.
//!
//! Where the time goes, and what this crate does about it:
//! - splitting text into chunks: a hand-written scanner for the GPT-4 pattern (split.rs) instead of
//!   a backtracking regex, run on all cores with the GIL released;
//! - counting chunks: one hash table per thread with the chunk bytes in an arena (train.rs);
//! - merging: incremental pair counts with a lazily refreshed heap, words edited in place
//!   (train.rs).
//!
//! Set RUSTBPE_LOG=1 to see the phases and their times on stderr.

use std::sync::atomic::{AtomicUsize, Ordering};

mod encode;
#[cfg(feature = "python")]
mod python;
mod split;
mod train;

// The public Rust API, which rustbpe/tests/core.rs tests without Python.
pub use encode::encode_chunk;
pub use split::{Splitter, DEFAULT_PATTERN, GPT4_PATTERN};
pub use train::{train_merges, ChunkCounts, Pair};

/// Number of worker threads: the cores this process may use, at most 8. Each counting thread keeps
/// its own table of distinct chunks (merged at the end), so memory grows with the thread count;
/// past 8 threads pulling documents out of Python is the bottleneck anyway.
pub fn num_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// Split every document of `docs` and count its chunks into `counters` (one per thread).
/// Threads take documents one at a time from a shared index, so one long document cannot leave
/// the others idle for the whole buffer. Err (only the fancy-regex fallback can fail): the error
/// of the first failing thread in spawn order, returned once every thread has stopped.
pub fn count_chunks(
    splitter: &Splitter,
    docs: &[&str],
    counters: &mut [ChunkCounts],
) -> Result<(), String> {
    let next_doc = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = counters
            .iter_mut()
            .map(|counter| {
                let next_doc = &next_doc;
                scope.spawn(move || {
                    // Relaxed is enough: the counter only hands out distinct indices, and the
                    // counts come back to the caller through the thread joins.
                    while let Some(doc) = docs.get(next_doc.fetch_add(1, Ordering::Relaxed)) {
                        splitter.for_each(doc, |chunk| counter.add(chunk.as_bytes(), 1))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("counting thread panicked"))
    })
}

/// Progress lines on stderr when RUSTBPE_LOG is set (seconds since the first line).
pub fn log(msg: impl std::fmt::Display) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    if std::env::var_os("RUSTBPE_LOG").is_some() {
        let t = START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64();
        eprintln!("rustbpe [{t:7.2}s] {msg}");
    }
}
