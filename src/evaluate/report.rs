//! The HTML report of a site validation.

use std::path::Path;

use super::{EvaluateError, EvaluateOptions, Evaluation};

pub fn write_report(
    _dir: &Path,
    _opts: &EvaluateOptions,
    _ev: &Evaluation,
) -> Result<(), EvaluateError> {
    Ok(())
}
