//! The pure-Rust core against slow but obvious references: the split scanner against fancy-regex,
//! the incremental merge loop against recounting every pair, and encoding by rank.
//! `cargo test --release -p rustbpe` (needs no Python).

use fancy_regex::Regex;
use rustbpe::{
    encode_chunk, train_merges, ChunkCounts, Pair, Splitter, DEFAULT_PATTERN, GPT4_PATTERN,
};
use rustc_hash::FxHashMap;

// ---- splitting

/// Tiny deterministic PRNG (xorshift) so the fuzz test needs no dependency.
fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn known_splits() {
    let s = Splitter::new(DEFAULT_PATTERN).unwrap();
    assert_eq!(s.split("Hello world").unwrap(), vec!["Hello", " world"]);
    assert_eq!(s.split("I'm 12345 ok").unwrap(), vec!["I", "'m", " ", "12", "34", "5", " ok"]);
    assert_eq!(s.split("  \n\n  x(y);\r\n").unwrap(), vec!["  \n\n", " ", " x", "(y", ");\r\n"]);
    assert_eq!(s.split("").unwrap(), Vec::<&str>::new());
}

#[test]
fn scanner_matches_fancy_regex_on_random_text() {
    // Every class boundary the pattern cares about: letters of several scripts, digits of
    // several kinds, whitespace kinds (incl. NEL, NBSP, ideographic space), the contraction
    // letters in both cases and 'ſ', punctuation, combining marks, emoji, and non-White_Space
    // separators (U+001C, zero-width space) that Python's str.isspace() would call space.
    let alphabet: Vec<char> = "aZéßж中あ😀🎉1٣½Ⅻ \t\n\r\u{3000}\u{a0}\u{85}\u{2028}\u{1c}\u{200b}\
                               'sSſlLvVeErRdDmMtTK.(-_#\u{301}\u{0}"
        .chars()
        .collect();
    let mut state = 0x9E3779B97F4A7C15u64;
    for pattern in [DEFAULT_PATTERN, GPT4_PATTERN] {
        let (scanner, re) = (Splitter::new(pattern).unwrap(), Regex::new(pattern).unwrap());
        assert!(matches!(scanner, Splitter::Gpt4 { .. }), "the scanner serves {pattern}");
        for _ in 0..50_000 {
            let len = (rng(&mut state) % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(rng(&mut state) % alphabet.len() as u64) as usize])
                .collect();
            let want: Vec<&str> = re.find_iter(&text).map(|m| m.unwrap().as_str()).collect();
            assert_eq!(scanner.split(&text).unwrap(), want, "text {text:?}");
        }
    }
}

#[test]
fn invalid_pattern_is_an_error() {
    assert!(Splitter::new("(unclosed").is_err());
}

// ---- training

fn counts(texts: &[(&str, u64)]) -> ChunkCounts {
    let mut c = ChunkCounts::default();
    for &(t, n) in texts {
        c.add(t.as_bytes(), n);
    }
    c
}

/// The textbook algorithm: recount every pair after every merge.
fn slow_merges(texts: &[(&str, u64)], num_merges: u32) -> Vec<Pair> {
    let mut words: Vec<(Vec<u32>, i64)> =
        texts.iter().map(|&(t, n)| (t.bytes().map(u32::from).collect(), n as i64)).collect();
    let mut merges = Vec::new();
    for i in 0..num_merges {
        let mut pc: std::collections::BTreeMap<Pair, i64> = Default::default();
        for (ids, n) in &words {
            for p in ids.windows(2) {
                *pc.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Max count, ties to the smallest pair (BTreeMap iterates smallest first: the first max).
        let Some((&best, _)) = pc.iter().fold(None, |acc: Option<(&Pair, &i64)>, kv| match acc {
            Some(a) if a.1 >= kv.1 => Some(a),
            _ => Some(kv),
        }) else {
            break;
        };
        merges.push(best);
        for (ids, _) in words.iter_mut() {
            let mut out = Vec::new();
            let mut j = 0;
            while j < ids.len() {
                if j + 1 < ids.len() && (ids[j], ids[j + 1]) == best {
                    out.push(256 + i);
                    j += 2;
                } else {
                    out.push(ids[j]);
                    j += 1;
                }
            }
            *ids = out;
        }
    }
    merges
}

#[test]
fn chunk_counts_dedupe() {
    let c = counts(&[("ab", 1), ("cd", 2), ("ab", 3)]);
    assert_eq!(c.len(), 2);
    let mut all: Vec<_> = c.iter().map(|(b, n)| (b.to_vec(), n)).collect();
    all.sort();
    assert_eq!(all, vec![(b"ab".to_vec(), 4), (b"cd".to_vec(), 2)]);
}

#[test]
fn tie_break_is_smallest_pair() {
    // "hello" and " hello" twice-ish: (e,l) (h,e) (l,l) (l,o) all tie at 2; (e,l) is smallest.
    let m = train_merges(counts(&[("hello", 1), (" world", 1), (" hello", 1)]), 4);
    assert_eq!(m, vec![(101, 108), (104, 256), (108, 111), (257, 258)]);
}

#[test]
fn repeated_tokens_merge_left_to_right() {
    let data = [("aaaaa", 3), ("aaa", 2), ("abab", 5), ("ba", 1)];
    assert_eq!(train_merges(counts(&data), 10), slow_merges(&data, 10));
}

#[test]
fn matches_slow_reference_on_pseudo_random_words() {
    let mut state = 12345u64;
    let mut texts = Vec::new();
    for _ in 0..300 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 1 + (state >> 60) as usize;
        let word: String =
            (0..len).map(|i| b"abcab "[((state >> (4 * i)) % 6) as usize] as char).collect();
        texts.push((word, 1 + (state >> 40) % 7));
    }
    let data: Vec<(&str, u64)> = texts.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    assert_eq!(train_merges(counts(&data), 60), slow_merges(&data, 60));
}

#[test]
fn stops_when_nothing_left_to_merge() {
    assert_eq!(train_merges(counts(&[("ab", 1)]), 100), vec![(97, 98)]);
}

#[test]
fn counts_beyond_32_bits() {
    let data = [("ab", 5_000_000_000), ("cd", 4_000_000_000), ("cd", 2_000_000_000)];
    assert_eq!(train_merges(counts(&data), 2), vec![(99, 100), (97, 98)]);
}

// ---- encoding

#[test]
fn merges_lowest_rank_first_and_leftmost() {
    let mut ranks = FxHashMap::default();
    ranks.insert((97, 97), 256); // aa
    ranks.insert((256, 97), 257); // aaa
    let mut out = Vec::new();
    encode_chunk(&ranks, b"aaaaa", &mut out);
    // aa aa a: "aa" merges first everywhere, then (aa, a) at the end.
    assert_eq!(out, vec![256, 257]);
}

#[test]
fn long_chunk_is_fast_enough() {
    let mut ranks = FxHashMap::default();
    ranks.insert((97, 97), 256);
    ranks.insert((256, 256), 257);
    let mut out = Vec::new();
    encode_chunk(&ranks, &vec![b'a'; 1_000_000], &mut out);
    assert_eq!(out.len(), 250_000);
    assert!(out.iter().all(|&t| t == 257));
}
