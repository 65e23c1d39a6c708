//! Pre-tokenization: cutting text into the chunks that BPE merges never cross.
//!
//! The GPT-4 split pattern needs a backtracking regex engine (possessive quantifiers and the
//! `(?!\S)` lookahead), and running it through fancy-regex is most of the time a trainer
//! spends. So the GPT-4 pattern (with `\p{N}{1,2}` or `\p{N}{1,3}`) is matched by a hand-written
//! scanner, `Gpt4Split`, that makes exactly the decisions the regex engine makes, alternative by
//! alternative; any other pattern falls back to fancy-regex. The unit tests compare the two on
//! random unicode-rich strings, and tests/test_rustbpe.py compares against Python's `regex`.

use std::sync::OnceLock;

use fancy_regex::Regex;

/// GPT-4's split pattern (cl100k) with numbers in groups of at most two digits (nanochat's choice:
/// smaller vocabularies waste fewer tokens on 3-digit numbers).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// GPT-4's split pattern exactly as cl100k has it (and the PyPI `rustbpe` default).
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// Character classes of the pattern: \p{L}, \p{N}, \s (Unicode White_Space) and everything else.
// The three are disjoint, so one byte per code point says which one a character is in.
const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// One class byte per code point (1.1 MB, built once), taken from regex-syntax's Unicode tables:
/// the same tables fancy-regex uses, so the scanner and the regex agree on every character.
fn class_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![OTHER; 0x110000];
        for (class, pattern) in [(LETTER, r"\p{L}"), (NUMBER, r"\p{N}"), (SPACE, r"\s")] {
            let hir = regex_syntax::Parser::new().parse(pattern).expect("valid class");
            let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(set)) =
                hir.kind()
            else {
                unreachable!("{pattern} parses to a Unicode class")
            };
            for range in set.iter() {
                table[range.start() as usize..=range.end() as usize].fill(class);
            }
        }
        table
    })
}

/// Decode the UTF-8 character starting at byte `i` of a valid &str: (class, code point, length).
#[inline(always)]
fn char_at(table: &[u8], s: &[u8], i: usize) -> (u8, u32, usize) {
    let b0 = s[i] as u32;
    let (c, len) = if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
    } else {
        let c = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (c, 4)
    };
    (table[c as usize], c, len)
}

/// Iterator over the chunks of `text` under the GPT-4 pattern with `\p{N}{1,max_digits}`.
pub struct Gpt4Split<'a> {
    text: &'a str,
    pos: usize,
    max_digits: usize,
    table: &'static [u8],
}

impl<'a> Gpt4Split<'a> {
    pub fn new(text: &'a str, max_digits: usize) -> Self {
        Gpt4Split { text, pos: 0, max_digits, table: class_table() }
    }

    /// End of the run of characters of class `class` starting at byte `i`.
    #[inline(always)]
    fn run_end(&self, mut i: usize, class: u8) -> usize {
        let s = self.text.as_bytes();
        while i < s.len() {
            let (k, _, len) = char_at(self.table, s, i);
            if k != class {
                break;
            }
            i += len;
        }
        i
    }

    /// End of the match starting at `i` (< len): the alternatives tried in the pattern's order.
    fn match_end(&self, i: usize) -> usize {
        let s = self.text.as_bytes();
        let n = s.len();
        let (class, c, len) = char_at(self.table, s, i);
        let next = i + len;

        // 1. '(?i:[sdmt]|ll|ve|re)   (case-insensitive: 'ſ' (U+017F) folds to 's')
        if c == '\'' as u32 && next < n {
            let (_, c1, len1) = char_at(self.table, s, next);
            let lower1 = if c1 == 0x17F { 's' as u32 } else { c1 | 0x20 * (c1 < 0x80) as u32 };
            if matches!(char::from_u32(lower1), Some('s' | 'd' | 'm' | 't')) {
                return next + len1;
            }
            if next + len1 < n && matches!(char::from_u32(lower1), Some('l' | 'v' | 'r')) {
                let (_, c2, len2) = char_at(self.table, s, next + len1);
                let lower2 = c2 | 0x20 * (c2 < 0x80) as u32;
                let want = if lower1 == 'l' as u32 { 'l' } else { 'e' };
                if lower2 == want as u32 {
                    return next + len1 + len2;
                }
            }
        }
        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        if class == LETTER {
            return self.run_end(next, LETTER);
        }
        if class != NUMBER
            && c != '\r' as u32
            && c != '\n' as u32
            && next < n
            && char_at(self.table, s, next).0 == LETTER
        {
            return self.run_end(next, LETTER);
        }
        // 3. \p{N}{1,max_digits}
        if class == NUMBER {
            let mut end = next;
            for _ in 1..self.max_digits {
                if end >= n {
                    break;
                }
                let (k, _, l) = char_at(self.table, s, end);
                if k != NUMBER {
                    break;
                }
                end += l;
            }
            return end;
        }
        // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`   (OTHER is exactly [^\s\p{L}\p{N}])
        let punct_start = if class == OTHER {
            Some(i)
        } else if c == ' ' as u32 && next < n && char_at(self.table, s, next).0 == OTHER {
            Some(next)
        } else {
            None
        };
        if let Some(start) = punct_start {
            let mut end = self.run_end(start, OTHER);
            while end < n && (s[end] == b'\r' || s[end] == b'\n') {
                end += 1;
            }
            return end;
        }
        // Only whitespace is left. `end` is the end of the whitespace run, `last` the start of its last char.
        let mut end = i;
        let mut last = i;
        let mut after_newline = None;
        while end < n {
            let (k, c, l) = char_at(self.table, s, end);
            if k != SPACE {
                break;
            }
            last = end;
            end += l;
            if c == '\r' as u32 || c == '\n' as u32 {
                after_newline = Some(end);
            }
        }
        // 5. \s*[\r\n]   (backtracks to the run's last newline)
        if let Some(e) = after_newline {
            return e;
        }
        // 6. \s+(?!\S)   (the whole run at the end of the text, else all but its last char)
        if end == n {
            return end;
        }
        if last > i {
            return last;
        }
        // 7. \s+
        end
    }
}

impl<'a> Iterator for Gpt4Split<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        self.pos = self.match_end(start);
        Some(&self.text[start..self.pos])
    }
}

/// A compiled split pattern: the hand-written scanner when the pattern is GPT-4's, else fancy-regex.
#[derive(Clone)]
pub enum Splitter {
    Gpt4 { max_digits: usize },
    Regex(Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 2 });
        }
        if pattern == GPT4_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 3 });
        }
        Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `f` on every chunk of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => Gpt4Split::new(text, *max_digits).for_each(f),
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    // fancy-regex fails only when its backtrack limit is hit: say so instead of panicking.
                    let m = m.map_err(|e| format!("split pattern failed on the text: {e}"))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }

    pub fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |chunk| out.push(chunk))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_split<'a>(re: &Regex, text: &'a str) -> Vec<&'a str> {
        re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

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
        assert_eq!(
            s.split("  \n\n  x(y);\r\n").unwrap(),
            vec!["  \n\n", " ", " x", "(y", ");\r\n"]
        );
        assert_eq!(s.split("").unwrap(), Vec::<&str>::new());
    }

    #[test]
    fn scanner_matches_fancy_regex_on_random_text() {
        // Every class boundary the pattern cares about: letters of several scripts, digits of
        // several kinds, whitespace kinds (incl. NEL, NBSP, ideographic space), the contraction
        // letters in both cases and 'ſ', punctuation, combining marks, emoji, and non-White_Space
        // separators (U+001C, zero-width space) that Python's str.isspace() would call space.
        let alphabet: Vec<char> = "aZéßж中あ😀🎉1٣½Ⅻ \t\n\r\u{3000}\u{a0}\u{85}\u{2028}\u{1c}\u{200b}'sSſlLvVeErRdDmMtTK.(-_#\u{301}\u{0}"
            .chars()
            .collect();
        let mut state = 0x9E3779B97F4A7C15u64;
        for max_digits in [2usize, 3] {
            let re =
                Regex::new(if max_digits == 2 { DEFAULT_PATTERN } else { GPT4_PATTERN }).unwrap();
            for _ in 0..50_000 {
                let len = (rng(&mut state) % 24) as usize;
                let text: String = (0..len)
                    .map(|_| alphabet[(rng(&mut state) % alphabet.len() as u64) as usize])
                    .collect();
                let ours: Vec<&str> = Gpt4Split::new(&text, max_digits).collect();
                assert_eq!(ours, regex_split(&re, &text), "text {text:?}");
            }
        }
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
