//! BPE training in two phases.
//!
//! 1. Counting: every document is split into chunks and each distinct chunk is counted once
//!    (`ChunkCounts`). Memory grows with the number of distinct chunks, not with the corpus.
//! 2. Merging (`train_merges`): repeatedly merge the most frequent adjacent pair (ties: the
//!    smallest pair, so the result does not depend on hash order or thread timing, and matches
//!    the PyPI rustbpe merge for merge) inside the distinct chunks, each weighted by its count.
//!    Counts are updated incrementally: a merge only touches the chunks listed for that pair, and
//!    the neighbours of every merged occurrence. A max-heap holds (count, pair); entries go stale
//!    when a count drops and are refreshed lazily when popped, which is exact because counts of
//!    existing pairs only ever decrease (new occurrences only appear in pairs containing the token
//!    just created).
//!
//! Working on distinct chunks is what makes training affordable: merges never cross chunk
//! boundaries (split.rs), so a chunk seen a million times is rewritten once by each merge that
//! touches it, its pairs weighted by a million, and the corpus is never held in memory whole.
//!
//! The merge loop's data structures, all indexed by integers to stay compact:
//! - `ids`: one arena of token ids holding every word (distinct chunk of 2+ bytes) back to back;
//!   a `Word` says where its tokens start, how many are left, and how often the chunk occurs.
//! - `stats`: pair -> `PairStat` (its weighted count, the words it may occur in), keyed by the
//!   pair packed into one u64 (`key`).
//! - `heap`: (count, pair) candidates for the next merge, possibly stale.
//!
//! lib.rs's `count_chunks` fills one `ChunkCounts` per thread; python.rs folds them into one with
//! `absorb` and hands that to `train_merges`, whose merges become the vocabulary.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

/// Two adjacent token ids (left, right). As a merge: merge i joins this pair into token 256 + i.
pub type Pair = (u32, u32);

/// Distinct chunks and their counts. The chunk bytes live in one arena; the hash table stores
/// (offset, length, count), 24 bytes per distinct chunk, instead of one heap allocation each.
/// The hasher is FxHash, much cheaper than the standard library's SipHash on short keys like
/// these; SipHash's resistance to crafted collisions is not needed on one's own training data.
#[derive(Default)]
pub struct ChunkCounts {
    bytes: Vec<u8>,
    table: HashTable<(usize, u32, u64)>,
}

impl ChunkCounts {
    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Count `chunk` `count` more times; its bytes are copied into the arena the first time only.
    #[inline]
    pub fn add(&mut self, chunk: &[u8], count: u64) {
        let hash = FxBuildHasher.hash_one(chunk);
        let bytes = &self.bytes;
        let found = self
            .table
            .find_mut(hash, |&(start, len, _)| &bytes[start..start + len as usize] == chunk);
        if let Some(entry) = found {
            entry.2 += count;
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(chunk);
        let bytes = &self.bytes;
        // The table keeps no full hashes: when it grows, it calls this to rehash every entry, which
        // reads the chunk back from the arena.
        self.table.insert_unique(hash, (start, chunk.len() as u32, count), |&(s, l, _)| {
            FxBuildHasher.hash_one(&bytes[s..s + l as usize])
        });
    }

    /// Fold `other` into `self`, freeing `other`.
    pub fn absorb(&mut self, other: ChunkCounts) {
        for (start, len, count) in other.table.into_iter() {
            self.add(&other.bytes[start..start + len as usize], count);
        }
    }

    /// (chunk bytes, count) for every distinct chunk, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.table
            .iter()
            .map(|&(start, len, count)| (&self.bytes[start..start + len as usize], count))
    }
}

/// What the merge loop keeps per pair: its total count over all chunks, and the chunks it may
/// occur in (a superset: entries are never removed). A word is listed at most once: a pair gains
/// words in one pass only (the initial count, or the merge that creates its newer token), and
/// that pass handles one word at a time, so checking the last entry catches every repeat.
#[derive(Default)]
struct PairStat {
    /// Occurrences summed over all words, each weighted by its word's count. Overlapping ones
    /// count: "aaa" holds (a, a) twice, though a merge can take only one of them.
    count: i64,
    words: Vec<u32>,
}

/// A distinct chunk of 2+ bytes: its tokens are `ids[start .. start + len]` in one arena shared by
/// all words, shrinking in place as merges apply. One struct per word keeps everything a merge
/// needs to know about a word in one cache line.
struct Word {
    start: usize,
    len: u32,
    /// How often the chunk occurs in the corpus: the weight of every pair in it.
    count: i64,
}

/// A hint to the CPU to start loading `x` into cache (no-op off x86-64).
#[inline(always)]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch(x as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Pack a pair into one u64: one integer to hash, and u64 order on keys is (a, b) order on pairs,
/// which the heap's tie-break relies on.
#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Train `num_merges` merges on the counted chunks. Returns the merged pairs in order: merge i
/// creates token 256 + i. Stops early when no pair occurs any more.
pub fn train_merges(chunks: ChunkCounts, num_merges: u32) -> Vec<Pair> {
    // Chunks of one byte hold no pair and can never take part in a merge: drop them.
    let mut ids: Vec<u32> = Vec::new();
    let mut words: Vec<Word> = Vec::new();
    for (chunk, count) in chunks.iter().filter(|(c, _)| c.len() >= 2) {
        words.push(Word { start: ids.len(), len: chunk.len() as u32, count: count as i64 });
        ids.extend(chunk.iter().map(|&b| b as u32));
    }
    // Free the counting table before the pair stats are built, to lower peak memory.
    drop(chunks);

    // Initial pair counts, and for every pair the words it occurs in (each word listed once).
    let mut stats: FxHashMap<u64, PairStat> = FxHashMap::default();
    for (w, word) in words.iter().enumerate() {
        for p in ids[word.start..word.start + word.len as usize].windows(2) {
            let stat = stats.entry(key(p[0], p[1])).or_default();
            stat.count += word.count;
            // Words are visited in order, so a repeat of w can only be the last entry.
            if stat.words.last() != Some(&(w as u32)) {
                stat.words.push(w as u32);
            }
        }
    }

    crate::log(format!("{} words of 2+ bytes, {} distinct pairs", words.len(), stats.len()));
    // Max-heap on count, ties to the smallest pair: (count, Reverse(pair key)).
    // Invariant between merges: every pair with a positive count has exactly one entry, and that
    // entry's count is never below the pair's current count (it is stale when above).
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
        stats.iter().map(|(&k, s)| (s.count, Reverse(k))).collect();

    let mut merges = Vec::with_capacity(num_merges as usize);
    let mut new_pairs: Vec<u64> = Vec::new();
    while merges.len() < num_merges as usize {
        let Some((count, Reverse(k))) = heap.pop() else {
            break;
        };
        // The top entry bounds every pair's count (invariant above). If it is current, its pair is
        // the most frequent, and the smallest of the most frequent: an equal pair with a smaller
        // key would have an entry ordered above this one. So this picks exactly the pair that a
        // full recount would. If it is stale, put it back at its current count and look again.
        let current = stats.get(&k).map_or(0, |s| s.count);
        if count != current {
            if current > 0 {
                heap.push((current, Reverse(k)));
            }
            continue;
        }
        // Only the initial entries can be 0 (chunks added with count 0); every later push is
        // positive. The best pair occurs with no weight: stop.
        if count <= 0 {
            break;
        }
        let (a, b) = ((k >> 32) as u32, k as u32);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));

        // Apply the merge to every word that may hold the pair, left to right, non-overlapping,
        // and update the counts of the pairs around each merged occurrence.
        // Taken, not cloned: the pair is removed after the loop, and nothing below adds to its
        // list (every pair that gains an occurrence contains new_id).
        let pair_words = std::mem::take(&mut stats.get_mut(&k).unwrap().words);
        new_pairs.clear();
        for (i, &w) in pair_words.iter().enumerate() {
            // Visiting a word is two cache misses (its Word, then its ids), which is most of the
            // merge loop's time: ask for both ahead of time, the Word further ahead than its ids.
            if let Some(&ahead) = pair_words.get(i + 16) {
                prefetch(&words[ahead as usize]);
            }
            if let Some(&ahead) = pair_words.get(i + 8) {
                prefetch(&ids[words[ahead as usize].start]);
            }
            let word = &mut words[w as usize];
            let (cnt, n) = (word.count, word.len as usize);
            let ids = &mut ids[word.start..word.start + n];
            let mut update = |a: u32, b: u32, delta: i64| {
                let stat = match stats.entry(key(a, b)) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        // A pair seen for the first time contains new_id; it gets its heap entry
                        // after the loop, once its count is final.
                        new_pairs.push(key(a, b));
                        e.insert(PairStat::default())
                    }
                };
                stat.count += delta;
                // Only gains list the word. One that loses the pair stays listed: if the pair is
                // merged later, its visit finds no occurrence, changes nothing, and costs a pass.
                if delta > 0 && stat.words.last() != Some(&w) {
                    stat.words.push(w);
                }
            };
            // Rewrite in place: write <= read, so no unread token is overwritten. The left
            // neighbour is read from the output, the right one from the input. So in "a b a b" the
            // first merge counts (new_id, a), and the second takes it back and counts
            // (new_id, new_id): the word ends with exactly the pair counts a full recount would
            // give it (but for (a, b) itself, which is dropped after the loop).
            let (mut read, mut write) = (0, 0);
            while read < n {
                if read + 1 < n && ids[read] == a && ids[read + 1] == b {
                    if write > 0 {
                        let x = ids[write - 1];
                        update(x, a, -cnt);
                        update(x, new_id, cnt);
                    }
                    if read + 2 < n {
                        let y = ids[read + 2];
                        update(b, y, -cnt);
                        update(new_id, y, cnt);
                    }
                    ids[write] = new_id;
                    read += 2;
                } else {
                    ids[write] = ids[read];
                    read += 1;
                }
                write += 1;
            }
            // The arena slots past the new end are dead; words only shrink, so none is reused.
            word.len = write as u32;
        }
        // Every occurrence of (a, b) is gone now: drop the pair (its count was not kept current).
        stats.remove(&k);
        // Only pairs holding new_id are new; every other pair's count went down or stayed.
        // Some new pairs cancel out to 0 (the (new_id, a) of "a b a b") and get no entry.
        for &p in &new_pairs {
            let c = stats[&p].count;
            if c > 0 {
                heap.push((c, Reverse(p)));
            }
        }
    }
    crate::log(format!("{} merges done", merges.len()));
    merges
}
