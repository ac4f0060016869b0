//! The kinds of object the node makes: how each is stored (the database
//! edge) and how `[[destinations]] outputs` filters on it.

/// Kind of output object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputKind {
    Sr,
    HeatmapSc,
    /// The report card, a Secondary Capture like the heatmaps.
    SummarySc,
    Gsps,
}

impl OutputKind {
    /// The name as stored (`outputs.kind`, the database edge).
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Sr => "sr",
            OutputKind::HeatmapSc => "sc",
            OutputKind::SummarySc => "summary",
            OutputKind::Gsps => "gsps",
        }
    }

    /// The name `[[destinations]] outputs` filters on: the summary card is
    /// a Secondary Capture and goes wherever "sc" goes.
    pub fn filter_name(self) -> &'static str {
        match self {
            OutputKind::SummarySc => "sc",
            other => other.as_str(),
        }
    }

    /// The names `[[destinations]] outputs` accepts.
    pub const FILTER_NAMES: [&'static str; 3] = ["sr", "sc", "gsps"];
}

/// An output kind no variant has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown output kind {0:?}")]
pub struct UnknownOutputKind(pub String);

impl std::str::FromStr for OutputKind {
    type Err = UnknownOutputKind;
    fn from_str(s: &str) -> Result<Self, UnknownOutputKind> {
        match s {
            "sr" => Ok(OutputKind::Sr),
            "sc" => Ok(OutputKind::HeatmapSc),
            "summary" => Ok(OutputKind::SummarySc),
            "gsps" => Ok(OutputKind::Gsps),
            other => Err(UnknownOutputKind(other.to_string())),
        }
    }
}

impl TryFrom<String> for OutputKind {
    type Error = UnknownOutputKind;
    fn try_from(s: String) -> Result<Self, UnknownOutputKind> {
        s.parse()
    }
}

impl std::fmt::Display for OutputKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl serde::Serialize for OutputKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
