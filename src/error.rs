//! [`Error`]: why a subcommand failed, and so the process's exit code — the one mapping.
//!
//! - **Usage** (64, `EX_USAGE`): the configuration or the command line is wrong, or the environment
//!   refuses it (a real IMDS answers where transparent mode would listen). Always before any port is bound.
//! - **Runtime** (1): anything else; printed with its cause chain.

use std::fmt;

use crate::config::ConfigError;

/// `EX_USAGE` from sysexits.h.
const EX_USAGE: u8 = 64;

/// A failed subcommand.
#[derive(Debug)]
pub enum Error {
    /// A configuration or usage error: exit 64.
    Usage(String),
    /// A runtime failure: exit 1.
    Runtime(anyhow::Error),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EX_USAGE,
            Self::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(message) => f.write_str(message),
            Self::Runtime(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Self::Usage(format!("configuration error: {e}"))
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Self::Runtime(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let config = ConfigError::Parse { path: "t.toml".into(), message: "bad".into() };
        let e = Error::from(config);
        assert_eq!((e.exit_code(), e.to_string()), (64, "configuration error: t.toml: bad".to_owned()));
        let e = Error::from(anyhow::anyhow!("inner").context("outer"));
        assert_eq!((e.exit_code(), e.to_string()), (1, "outer: inner".to_owned()));
    }
}
