//! The crate's error type: every variant names what was wrong and what was expected.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{key} = {value} is not allowed; expected {allowed}")]
    BadValue {
        key: String,
        value: String,
        allowed: String,
    },
    #[error("contradictory settings: {0}")]
    Contradiction(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An error about the file at `path`: the message says what is wrong with it.
pub fn file_error(path: &std::path::Path, message: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

impl Error {
    pub fn bad_value(key: &str, value: impl std::fmt::Display, allowed: &str) -> Self {
        Self::BadValue {
            key: key.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
