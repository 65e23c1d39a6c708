//! Pre-tokenization: cutting text into the chunks that BPE merges never cross.
//!
//! The GPT-4 split pattern needs a backtracking regex engine (possessive quantifiers and the
//! `(?!\S)` lookahead), and running it through fancy-regex is most of the time a trainer
//! spends. So the GPT-4 pattern (with `\p{N}{1,2}` or `\p{N}{1,3}`) is matched by a hand-written
//! scanner, `Gpt4Split`, that makes exactly the decisions the regex engine makes, alternative by
//! alternative; any other pattern falls back to fancy-regex. rustbpe/tests/core.rs compares the two
//! on random unicode-rich strings, and tests/test_rustbpe.py compares against Python's `regex`.
//!
//! Why split at all: merges never cross a chunk boundary, so no token spans a word and the
//! punctuation after it, or letters and digits; and the trainer can count distinct chunks instead
//! of walking the corpus (train.rs). Training (lib.rs's `count_chunks`) and encoding (python.rs)
//! cut text with the same `Splitter`, so encoding sees the kind of chunks the merges came from.

use std::sync::OnceLock;

use fancy_regex::Regex;

/// GPT-4's split pattern (cl100k) with numbers in groups of at most two digits (nanochat's choice:
/// smaller vocabularies waste fewer tokens on 3-digit numbers).
pub const DEFAULT_PATTERN: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}",
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
);
/// GPT-4's split pattern exactly as cl100k has it (and the PyPI `rustbpe` default).
pub const GPT4_PATTERN: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
);

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

/// Iterator over the chunks of `text` under the GPT-4 pattern with `\p{N}{1,max_digits}`.
struct Gpt4Split<'a> {
    text: &'a str,
    /// Byte offset where the next chunk starts: always a char boundary, as `at` needs.
    pos: usize,
    max_digits: usize,
    /// `class_table()`, fetched once per text instead of once per character.
    table: &'static [u8],
}

/// Case folding as `(?i:...)` does it for the contraction letters: ASCII, and 'ſ' (U+017F) is 's'.
fn fold(c: char) -> char {
    match c {
        'ſ' => 's',
        _ => c.to_ascii_lowercase(),
    }
}

impl<'a> Gpt4Split<'a> {
    /// A scanner over `text`; `max_digits` is the N of the pattern's `\p{N}{1,N}`.
    fn new(text: &'a str, max_digits: usize) -> Self {
        Gpt4Split { text, pos: 0, max_digits, table: class_table() }
    }

    /// The character starting at byte `i`: (its class, itself, the byte after it); None at the end.
    #[inline(always)]
    fn at(&self, i: usize) -> Option<(u8, char, usize)> {
        let &byte = self.text.as_bytes().get(i)?;
        // ASCII (most of any code) skips the general UTF-8 decoder: a few percent of training time
        let c = if byte < 0x80 { byte as char } else { self.text[i..].chars().next()? };
        Some((self.table[c as usize], c, i + c.len_utf8()))
    }

    /// End of the run of characters of class `class` starting at byte `i`.
    #[inline(always)]
    fn run_end(&self, mut i: usize, class: u8) -> usize {
        while let Some((_, _, next)) = self.at(i).filter(|&(k, ..)| k == class) {
            i = next;
        }
        i
    }

    /// End of the match starting at `i` (< len): the alternatives tried in the pattern's order.
    /// Like the regex engine, this takes the first alternative that matches, not the longest, so
    /// each `return` is final.
    fn match_end(&self, i: usize) -> usize {
        let (class, c, next) = self.at(i).expect("a match starts before the end");

        // 1. '(?i:[sdmt]|ll|ve|re)
        // On no match, fall through: `'` followed by letters is then alternative 2.
        if c == '\'' {
            if let Some((_, c1, after1)) = self.at(next) {
                let second = match fold(c1) {
                    's' | 'd' | 'm' | 't' => return after1,
                    'l' => Some('l'),
                    'v' | 'r' => Some('e'),
                    _ => None,
                };
                if let (Some(want), Some((_, c2, after2))) = (second, self.at(after1)) {
                    if fold(c2) == want {
                        return after2;
                    }
                }
            }
        }
        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        // The optional prefix excludes letters, so at a letter it is empty and \p{L}+ takes the
        // whole run; otherwise the prefix is this character and a letter must follow it.
        if class == LETTER {
            return self.run_end(next, LETTER);
        }
        let before_letter = matches!(self.at(next), Some((LETTER, ..)));
        if class != NUMBER && c != '\r' && c != '\n' && before_letter {
            return self.run_end(next, LETTER);
        }
        // 3. \p{N}{1,max_digits}
        // Long numbers become several chunks ("12345": "12", "34", "5"), and no space joins a
        // number: " 12" is " " (alternative 7), then "12".
        if class == NUMBER {
            let mut end = next;
            for _ in 1..self.max_digits {
                match self.at(end) {
                    Some((NUMBER, _, after)) => end = after,
                    _ => break,
                }
            }
            return end;
        }
        // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`   (OTHER is exactly [^\s\p{L}\p{N}])
        let punct_start = match (class, c, self.at(next)) {
            (OTHER, ..) => Some(i),
            // Only a plain space may lead punctuation: not a tab, not a newline.
            (_, ' ', Some((OTHER, ..))) => Some(next),
            _ => None,
        };
        if let Some(start) = punct_start {
            let end = self.run_end(start, OTHER);
            // \r and \n are single bytes in UTF-8, so bytes can be scanned here instead of chars.
            let newlines = self.text.as_bytes()[end..].iter().take_while(|b| b"\r\n".contains(b));
            return end + newlines.count();
        }
        // Only whitespace is left: `end` is the end of the run, `last` the start of its last char.
        let (mut end, mut last, mut after_newline) = (i, i, None);
        while let Some((SPACE, c, after)) = self.at(end) {
            (last, end) = (end, after);
            if c == '\r' || c == '\n' {
                after_newline = Some(end);
            }
        }
        // 5. \s*[\r\n]   (backtracks to the run's last newline)
        if let Some(e) = after_newline {
            return e;
        }
        // 6. \s+(?!\S)   (the whole run at the end of the text, else all but its last char)
        //    That last char is left to lead the next chunk: "a  b" is "a", " ", " b".
        // 7. \s+         (a single whitespace character before a non-space)
        if end == self.text.len() || last == i {
            end
        } else {
            last
        }
    }
}

impl<'a> Iterator for Gpt4Split<'a> {
    type Item = &'a str;

    /// Every character starts some alternative (letter, number, punctuation, whitespace each has
    /// one) and every match is at least one character, so the chunks tile the text: no gaps, no
    /// empty chunks, and `pos` always advances.
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

/// A compiled split pattern: the hand-written scanner when the pattern is GPT-4's, else
/// fancy-regex.
#[derive(Clone)]
pub enum Splitter {
    /// `Gpt4Split`, for `DEFAULT_PATTERN` (2 digits) and `GPT4_PATTERN` (3 digits).
    Gpt4 { max_digits: usize },
    /// Any other pattern, run by fancy-regex.
    Regex(Regex),
}

impl Splitter {
    /// Compile `pattern`. The scanner serves it only when the string is exactly one of the two
    /// constants: an equivalent pattern spelled differently gets fancy-regex (same chunks, slower).
    /// Err(message) when fancy-regex rejects the pattern.
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        match pattern {
            DEFAULT_PATTERN => Ok(Splitter::Gpt4 { max_digits: 2 }),
            GPT4_PATTERN => Ok(Splitter::Gpt4 { max_digits: 3 }),
            _ => Regex::new(pattern)
                .map(Splitter::Regex)
                .map_err(|e| format!("invalid split pattern {pattern:?}: {e}")),
        }
    }

    /// Call `f` on every chunk of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => Gpt4Split::new(text, *max_digits).for_each(f),
            Splitter::Regex(re) => {
                // Text that no match covers is skipped, as Python's regex.findall skips it.
                for m in re.find_iter(text) {
                    // fancy-regex fails only when its backtrack limit is hit: say so, not panic.
                    let m = m.map_err(|e| format!("split pattern failed on the text: {e}"))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }

    /// The chunks of `text` in order, collected (for tests and Python's `split_text`).
    pub fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |chunk| out.push(chunk))?;
        Ok(out)
    }
}
