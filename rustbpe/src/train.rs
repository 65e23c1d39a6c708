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

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

pub type Pair = (u32, u32);

/// Distinct chunks and their counts. The chunk bytes live in one arena; the hash table stores
/// (offset, length, count), 24 bytes per distinct chunk, instead of one heap allocation each.
#[derive(Default)]
pub struct ChunkCounts {
    bytes: Vec<u8>,
    table: HashTable<(usize, u32, u64)>,
}

impl ChunkCounts {
    pub fn len(&self) -> usize {
        self.table.len()
    }

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
/// occur in (a superset: entries are never removed, and a chunk may appear more than once).
#[derive(Default)]
struct PairStat {
    count: i64,
    words: Vec<u32>,
}

/// A distinct chunk of 2+ bytes: its tokens are `ids[start .. start + len]` in one arena shared by
/// all words, shrinking in place as merges apply. One struct per word keeps everything a merge
/// needs to know about a word in one cache line.
struct Word {
    start: usize,
    len: u32,
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
    drop(chunks);

    // Initial pair counts, and for every pair the words it occurs in (each word listed once).
    let mut stats: FxHashMap<u64, PairStat> = FxHashMap::default();
    for (w, word) in words.iter().enumerate() {
        for p in ids[word.start..word.start + word.len as usize].windows(2) {
            let stat = stats.entry(key(p[0], p[1])).or_default();
            stat.count += word.count;
            if stat.words.last() != Some(&(w as u32)) {
                stat.words.push(w as u32);
            }
        }
    }

    crate::log(format!("{} words of 2+ bytes, {} distinct pairs", words.len(), stats.len()));
    // Max-heap on count, ties to the smallest pair: (count, Reverse(pair key)).
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
        stats.iter().map(|(&k, s)| (s.count, Reverse(k))).collect();

    let mut merges = Vec::with_capacity(num_merges as usize);
    let mut new_pairs: Vec<u64> = Vec::new();
    while merges.len() < num_merges as usize {
        let Some((count, Reverse(k))) = heap.pop() else {
            break;
        };
        let current = stats.get(&k).map_or(0, |s| s.count);
        if count != current {
            if current > 0 {
                heap.push((current, Reverse(k)));
            }
            continue;
        }
        if count <= 0 {
            break;
        }
        let (a, b) = ((k >> 32) as u32, k as u32);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));

        // Apply the merge to every word that may hold the pair, left to right, non-overlapping,
        // and update the counts of the pairs around each merged occurrence.
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
                        new_pairs.push(key(a, b));
                        e.insert(PairStat::default())
                    }
                };
                stat.count += delta;
                if delta > 0 && stat.words.last() != Some(&w) {
                    stat.words.push(w);
                }
            };
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
            word.len = write as u32;
        }
        // Every occurrence of (a, b) is gone now: drop the pair (its count was not kept current).
        stats.remove(&k);
        // Only pairs holding new_id are new; every other pair's count went down or stayed.
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
