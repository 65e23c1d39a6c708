//! The Python module: `rustbpe.Tokenizer` (the PyPI `rustbpe` interface) and `rustbpe.split_text`.
//! Built only with the `python` feature (maturin turns it on), so `cargo test` needs no Python.
//! It targets CPython's stable ABI (abi3) from 3.10 on: one wheel serves 3.10 and every later
//! version.
//!
//! What Python sees: `Tokenizer()` with `train_from_iterator`, `get_pattern`,
//! `get_mergeable_ranks` (what tiktoken takes), `encode`, `batch_encode`, `decode` and the
//! `vocab_size` property; the function `split_text`; the `DEFAULT_PATTERN` and `GPT4_PATTERN`
//! strings.
//!
//! The GIL: Python objects may only be touched by a thread that holds it, and while one thread
//! holds it no other Python thread runs. So each method does its Python work (pulling documents,
//! converting arguments and results) with the GIL and releases it (`py.detach`) for the Rust work:
//! splitting and counting, merging, encoding. Meanwhile the Rust threads run in parallel, and the
//! program's other Python threads (a data loader, say) keep running. Training goes one step
//! further: while the workers count one buffer, the calling thread takes the GIL back
//! (`Python::attach`) to pull the next buffer from the iterator.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};
use rustc_hash::FxHashMap;

use crate::{
    count_chunks, encode_chunk, log, num_threads, train_merges, ChunkCounts, Pair, Splitter,
    DEFAULT_PATTERN, GPT4_PATTERN,
};

/// Pull up to `size` documents from `iter` into `buffer`; Ok(true) when the iterator is exhausted.
///
/// No document is copied when it can be avoided: an ASCII str is kept as is and its bytes are read
/// in place (a str is immutable, and the buffer keeps it alive). Any other str is encoded to a
/// temporary bytes object, because asking CPython for its UTF-8 would attach a cached copy to the
/// str for as long as it lives (for the whole of a corpus list the caller keeps).
fn fill_buffer(
    iter: &Bound<'_, PyIterator>,
    buffer: &mut Vec<Py<PyAny>>,
    size: usize,
    seen: &mut usize,
) -> PyResult<bool> {
    // Another handle on the same Python iterator (a refcount increment): `next` needs a mutable
    // one, and advancing it advances the caller's.
    let mut iter = iter.clone();
    while buffer.len() < size {
        let Some(item) = iter.next() else {
            return Ok(true);
        };
        let item = item?;
        let Ok(text) = item.cast::<PyString>() else {
            return Err(PyTypeError::new_err(format!(
                "train_from_iterator needs str items, but item {seen} is {}",
                type_name(&item)
            )));
        };
        // str.isascii() reads a flag CPython keeps on every str: O(1), no scan of the text.
        if !text.call_method0("isascii")?.is_truthy()? {
            // Fails only for a str holding lone surrogates, which UTF-8 cannot encode.
            let utf8 = text.encode_utf8().map_err(|e| {
                PyValueError::new_err(format!("item {seen} is not valid text: {e}"))
            })?;
            buffer.push(utf8.into_any().unbind());
        } else {
            buffer.push(item.unbind());
        }
        *seen += 1;
    }
    Ok(false)
}

/// The text of a buffered document: an ASCII str or the UTF-8 bytes of another one.
fn doc_text<'a>(py: Python<'a>, doc: &'a Py<PyAny>) -> PyResult<&'a str> {
    let doc = doc.bind(py);
    if let Ok(text) = doc.cast::<PyString>() {
        // An ASCII str's storage is already UTF-8: CPython hands it out without a copy.
        return text.to_str();
    }
    let bytes = doc.cast::<PyBytes>()?.as_bytes();
    // These bytes come from encode_utf8, so this cannot fail; checking costs one fast pass and
    // keeps the code free of `unsafe`.
    std::str::from_utf8(bytes)
        .map_err(|e| PyValueError::new_err(format!("a document is not valid UTF-8: {e}")))
}

/// A byte-level BPE tokenizer: 256 byte tokens, then one token per merge.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    /// `merges[i]` is the pair merged into token 256 + i.
    merges: Vec<Pair>,
    /// pair -> the token it merges into (its rank, for encoding).
    ranks: FxHashMap<Pair, u32>,
    /// The split pattern as given, for `get_pattern`; `splitter` is the same pattern compiled.
    pattern: String,
    splitter: Splitter,
}

impl Tokenizer {
    /// The bytes of every token, indexed by id.
    fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut table: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            // Merge i only joins tokens below 256 + i, so both halves are already in the table.
            let merged = [table[a as usize].as_slice(), table[b as usize].as_slice()].concat();
            table.push(merged);
        }
        table
    }

    /// Split `text` and encode every chunk. Err only when the fancy-regex fallback fails.
    fn encode_str(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter
            .for_each(text, |chunk| encode_chunk(&self.ranks, chunk.as_bytes(), &mut out))?;
        Ok(out)
    }
}

#[pymethods]
impl Tokenizer {
    // An untrained tokenizer: the 256 byte tokens and the default pattern.
    #[new]
    fn new() -> Self {
        Tokenizer {
            merges: Vec::new(),
            ranks: FxHashMap::default(),
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::new(DEFAULT_PATTERN).expect("the default pattern compiles"),
        }
    }

    /// Train on an iterator of str: `vocab_size` = 256 + number of merges. Documents are pulled
    /// `buffer_size` at a time under the GIL, then split and counted on all cores without it.
    /// `pattern` defaults to GPT-4's split pattern with `\p{N}{1,2}`.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        // Taken as i64 so that a negative size gets this message, not a conversion error; the upper
        // bound keeps every token id a u32.
        if !(256..=u32::MAX as i64).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let iter: Py<PyIterator> = iterator
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "train_from_iterator needs an iterable of str, got {}",
                    type_name(iterator)
                ))
            })?
            .unbind();

        log("training starts");
        let mut counters: Vec<ChunkCounts> =
            (0..num_threads()).map(|_| ChunkCounts::default()).collect();
        // Double buffering: while the worker threads count one buffer without the GIL, this thread
        // takes the GIL back to pull the next buffer from the Python iterator, so a slow Python
        // source (parquet reading, say) overlaps with the counting instead of adding to it.
        let mut current: Vec<Py<PyAny>> = Vec::with_capacity(buffer_size);
        let mut next: Vec<Py<PyAny>> = Vec::with_capacity(buffer_size);
        let mut seen = 0usize;
        let mut exhausted = fill_buffer(iter.bind(py), &mut current, buffer_size, &mut seen)?;
        while !current.is_empty() {
            // Borrowed from the objects in `current`, which keep them alive until the counting
            // is done. Reading them without the GIL is safe: str and bytes objects never change.
            let docs: Vec<&str> =
                current.iter().map(|doc| doc_text(py, doc)).collect::<PyResult<_>>()?;
            let (counted, fetched) = py.detach(|| {
                std::thread::scope(|scope| {
                    let counting = scope.spawn(|| count_chunks(&splitter, &docs, &mut counters));
                    let fetched = if exhausted {
                        Ok(true)
                    } else {
                        Python::attach(|py| {
                            fill_buffer(iter.bind(py), &mut next, buffer_size, &mut seen)
                        })
                    };
                    (counting.join().expect("counting thread panicked"), fetched)
                })
            });
            counted.map_err(PyValueError::new_err)?;
            exhausted = fetched?;
            // `docs` points into the objects that `next.clear()` releases after the swap.
            drop(docs);
            std::mem::swap(&mut current, &mut next);
            next.clear();
        }
        log(format!("{seen} documents split and counted"));

        // Merging is single-threaded but long: without the GIL, other Python threads run meanwhile.
        let merges = py.detach(|| {
            // Folded into the first thread's table (no rehash of that one).
            let mut counters = counters.into_iter();
            let mut chunks = counters.next().unwrap_or_default();
            counters.for_each(|other| chunks.absorb(other));
            log(format!("{seen} documents, {} distinct chunks", chunks.len()));
            train_merges(chunks, (vocab_size - 256) as u32)
        });
        self.ranks = merges.iter().enumerate().map(|(i, &pair)| (pair, 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    /// The split pattern (the default one until training sets another).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, rank)] for ranks 0..vocab_size-1: the 256 single bytes, then the merges in
    /// order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.token_bytes()
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// Token ids of `text`: split with the pattern, then merge by rank (identical to tiktoken).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        // Without the GIL, so several Python threads can encode at the same time.
        py.detach(|| self.encode_str(text)).map_err(PyValueError::new_err)
    }

    /// Encode many texts on all cores.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        // `texts` arrive as Rust Strings (pyo3 copies each str, with the GIL), so the threads need
        // no Python objects. Each thread takes one contiguous slice, so the results concatenate
        // back in input order; texts of very different lengths can leave some threads idle.
        let per_thread = texts.len().div_ceil(num_threads()).max(1);
        let parts: Result<Vec<Vec<Vec<u32>>>, String> = py.detach(|| {
            std::thread::scope(|scope| {
                let encode = |part: &'_ [String]| part.iter().map(|t| self.encode_str(t)).collect();
                let threads: Vec<_> = texts
                    .chunks(per_thread)
                    .map(|part| scope.spawn(move || encode(part)))
                    .collect();
                threads.into_iter().map(|t| t.join().expect("encoding thread panicked")).collect()
            })
        });
        Ok(parts.map_err(PyValueError::new_err)?.concat())
    }

    /// Text of token ids; byte sequences that are not valid UTF-8 become U+FFFD.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        // Rebuilt on every call: a cost that grows with the vocabulary, not with `ids`.
        let table = self.token_bytes();
        let out_of_range =
            |id| format!("token id {id} is out of range (vocab_size {})", table.len());
        let bytes: Vec<&[u8]> = ids
            .iter()
            .map(|&id| table.get(id as usize).map(Vec::as_slice).ok_or_else(|| out_of_range(id)))
            .collect::<Result<_, _>>()
            .map_err(PyValueError::new_err)?;
        Ok(String::from_utf8_lossy(&bytes.concat()).into_owned())
    }

    /// 256 + number of merges.
    #[getter]
    fn vocab_size(&self) -> u32 {
        256 + self.merges.len() as u32
    }
}

/// The Python type name of `obj`, for error messages ("?" if it cannot be read).
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(|_| "?".to_string(), |n| n.to_string())
}

/// The chunks `text` is cut into before merging (default pattern: GPT-4's with `\p{N}{1,2}`).
/// Not in the PyPI package: it exists so tests can compare the split with Python's `regex`.
#[pyfunction]
#[pyo3(signature = (text, pattern=None))]
fn split_text(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let splitter =
        Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(PyValueError::new_err)?;
    let chunks = splitter.split(text).map_err(PyValueError::new_err)?;
    Ok(chunks.into_iter().map(str::to_string).collect())
}

// The module's init. Its name must match `module-name` in pyproject.toml's [tool.maturin]:
// Python imports the extension by looking up the `PyInit_rustbpe` symbol it exports.
#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
