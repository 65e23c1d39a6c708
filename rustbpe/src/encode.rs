//! Encoding one chunk with trained merges, exactly as tiktoken does: repeatedly merge the adjacent
//! pair of lowest rank (the earliest merge), leftmost first. A min-heap of (rank, position) over a
//! linked list keeps it O(n log n), so one 1,000,000-character chunk encodes in milliseconds.
//!
//! Training does not use this: it only learns the merges (train.rs). python.rs's `encode` splits
//! text with the training pattern and calls `encode_chunk` on each chunk; in production the
//! trained ranks go to tiktoken, which does the same thing.
//!
//! The rank of a pair is the id of the token it merges into (merge i makes token 256 + i), so the
//! lowest rank is the earliest merge, and a rank names exactly one pair.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::train::Pair;

/// End of the linked list, in `next` and `prev`.
const NONE: usize = usize::MAX;
/// `tok` of a position merged into its left neighbour. No real token has this id: python.rs caps
/// vocab_size at u32::MAX, so ids stay below it.
const DEAD: u32 = u32::MAX;

/// Append the token ids of `chunk` to `out`. `ranks` maps a pair to the token it merges into.
pub fn encode_chunk(ranks: &FxHashMap<Pair, u32>, chunk: &[u8], out: &mut Vec<u32>) {
    let n = chunk.len();
    if n < 2 {
        out.extend(chunk.iter().map(|&b| b as u32));
        return;
    }
    // One slot per byte position, never moved: merging (i, j) leaves the new token at i, marks j
    // DEAD and unlinks it, so heap entries can name pairs by the left position alone.
    let mut tok: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
    let mut next: Vec<usize> = (1..=n).map(|j| if j < n { j } else { NONE }).collect();
    let mut prev: Vec<usize> = (0..n).map(|j| if j > 0 { j - 1 } else { NONE }).collect();
    let rank = |a: u32, b: u32| ranks.get(&(a, b)).copied();
    // Min-heap on (rank, position): the earliest merge first, and among equal ranks the leftmost
    // occurrence, since positions keep their left-to-right order.
    let mut heap: BinaryHeap<Reverse<(u32, usize)>> =
        (0..n - 1).filter_map(|i| rank(tok[i], tok[i + 1]).map(|r| Reverse((r, i)))).collect();
    while let Some(Reverse((r, i))) = heap.pop() {
        // Stale entries: the left token was merged away, or the pair at i is no longer this one.
        // Entries are never removed when a merge changes a pair, only checked here (lazy
        // deletion). A rank names one pair, so an entry whose rank still matches is valid.
        let j = next[i];
        if tok[i] == DEAD || j == NONE || rank(tok[i], tok[j]) != Some(r) {
            continue;
        }
        // The rank is the new token's id.
        tok[i] = r;
        tok[j] = DEAD;
        next[i] = next[j];
        // The merged token makes new pairs with both neighbours: at most two pushes per merge, so
        // the heap sees O(n) entries in all.
        if next[i] != NONE {
            prev[next[i]] = i;
            if let Some(r2) = rank(r, tok[next[i]]) {
                heap.push(Reverse((r2, i)));
            }
        }
        if prev[i] != NONE {
            if let Some(r2) = rank(tok[prev[i]], r) {
                heap.push(Reverse((r2, prev[i])));
            }
        }
    }
    // Position 0 is never DEAD: only a pair's right position dies.
    let mut i = 0;
    while i != NONE {
        out.push(tok[i]);
        i = next[i];
    }
}
