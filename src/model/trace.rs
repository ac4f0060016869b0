//! Optional recording of named intermediate tensors (stage and block outputs)
//! so that tests can compare a forward pass with the reference stage by stage.

use candle_core::Tensor;

/// Named intermediates of one forward pass. A disabled trace records nothing,
/// so the normal forward path pays nothing for it.
#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    prefix: String,
    entries: Vec<(String, Tensor)>,
}

impl Trace {
    /// A trace that records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A trace that records every intermediate, names prefixed with `prefix`
    /// (e.g. `"mri."`).
    pub fn enabled(prefix: &str) -> Self {
        Self {
            enabled: true,
            prefix: prefix.to_string(),
            entries: Vec::new(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Record `t` under `name` (built lazily, so disabled traces format nothing).
    pub(crate) fn record(&mut self, name: impl FnOnce() -> String, t: &Tensor) {
        if self.enabled {
            let name = format!("{}{}", self.prefix, name());
            self.entries.push((name, t.clone()));
        }
    }

    /// Record a tensor produced only for the trace (e.g. a re-layout).
    pub(crate) fn record_with(
        &mut self,
        name: impl FnOnce() -> String,
        t: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<()> {
        if self.enabled {
            let t = t()?;
            self.record(name, &t);
        }
        Ok(())
    }

    /// Move all entries of `other` into this trace.
    pub(crate) fn absorb(&mut self, other: Trace) {
        self.entries.extend(other.entries);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn entries(&self) -> &[(String, Tensor)] {
        &self.entries
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }
}
