//! What `explain` and `verify` share in printing: text for people, JSON for tools.

use serde::Serialize;

use crate::cli;

/// How a result is printed: text for people, JSON for tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl From<cli::Output> for Format {
    fn from(o: cli::Output) -> Self {
        match o {
            cli::Output::Text => Format::Text,
            cli::Output::Json => Format::Json,
        }
    }
}

/// One line of compact JSON.
pub(super) fn to_json(value: &impl Serialize) -> String {
    let mut s = serde_json::to_string(value).expect("plain data serializes");
    s.push('\n');
    s
}
