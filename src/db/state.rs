//! The stored vocabularies: case states and delivery states as enums. Their
//! names appear as text only here (`as_str` to bind, `FromStr` to read back),
//! so that SQL binds a state as a parameter and no other module spells one.

use std::fmt;
use std::str::FromStr;

/// A stored name that no variant has: the database holds a state this build
/// does not know (a newer node wrote it, or the row was edited by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?} in the database")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

/// An enum stored as text: `as_str`/`FromStr`/`TryFrom<String>` at the
/// database edge, `Display` (padding honoured, for the CLI's tables) and
/// `Serialize` (the `--json` outputs) as the same text.
macro_rules! stored_names {
    ($(#[$meta:meta])* $name:ident ($what:literal) {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];

            /// The name as stored.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownName { kind: $what, name: other.to_string() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownName;
            fn try_from(s: String) -> Result<Self, UnknownName> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

stored_names! {
    /// A case's state: `collecting` → `ready` → `queued` → `running` →
    /// `done`, with `held` (operator or `partial = "hold"`) and `failed`; a
    /// late instance reopens a `done` case as a new revision.
    CaseState ("case state") {
        #[default]
        Collecting = "collecting",
        Ready = "ready",
        Queued = "queued",
        Running = "running",
        Held = "held",
        Done = "done",
        Failed = "failed",
    }
}

stored_names! {
    /// An outbox row's delivery state.
    DeliveryState ("delivery state") {
        /// Due at `next_attempt_at` (first attempt or retry).
        #[default]
        Pending = "pending",
        Sent = "sent",
        /// Dead letter: permanent failure or attempts exhausted; only an
        /// operator retry puts it back.
        Dead = "dead",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in CaseState::ALL {
            assert_eq!(s.as_str().parse::<CaseState>(), Ok(*s));
        }
        for s in DeliveryState::ALL {
            assert_eq!(s.as_str().parse::<DeliveryState>(), Ok(*s));
        }
        assert!("Collecting".parse::<CaseState>().is_err());
        assert_eq!(format!("{:<8}|", CaseState::Done), "done    |");
    }
}
