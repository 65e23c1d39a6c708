use pyo3::prelude::*;

/// Placeholder until the tokenizer issue lands: the crate compiles and imports.
#[pymodule]
fn rustbpe(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
