//! tokend: a local token broker.
//!
//! It authenticates once to Microsoft Entra ID (or any OAuth2 token endpoint) as a service principal,
//! caches the access tokens it gets, refreshes them before they expire and serves them on loopback in
//! the managed-identity dialects every Azure SDK speaks (IMDS and App Service).
//!
//! The code map, the layers (each module uses only those below it; a test enforces it) and the
//! invariants are in `ARCHITECTURE.md`. The library's public surface is what the `tokend` binary
//! needs: [`commands`], one function per subcommand, and [`Error`], which decides the exit code.

mod access;
mod audit;
#[doc(hidden)]
pub mod bench;
mod broker;
mod caller;
mod clock;
pub mod commands;
mod config;
mod credential;
mod daemon;
mod dev;
mod dialect;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod idp;
mod metrics;
mod net;
mod process;
mod resource;
mod secret;
mod server;
mod snapshot;
mod token;
mod transparent;

pub use config::DEFAULT_LISTEN;
pub use error::Error;
