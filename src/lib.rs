//! tokend: a local token broker.
//!
//! It authenticates once to Microsoft Entra ID (or any OAuth2 token endpoint) as a service principal,
//! caches the access tokens it gets, refreshes them before they expire and serves them on loopback in
//! the two managed-identity dialects every Azure SDK speaks (IMDS and App Service).
//!
//! Crate map:
//! - [`config`]: the TOML file (and the Azure SDK environment variables) → a validated [`config::Config`].
//! - [`credential`]: the client credential of an identity; its `Debug` is redacted.
//! - [`identity`]: the configured identities and how a caller's selector picks one.
//! - [`resource`]: resource normalisation (the cache key) and the scope sent upstream.
//! - [`idp`]: the only module that talks to an identity provider (client-credentials grant).
//! - [`token`]: access tokens, the single-flight cache and its background refresher.
//! - [`dialect`]: the only modules that know the IMDS and App Service wire formats.
//! - [`reload`]: live reload — credential files polled, SIGHUP reloads the whole file.
//! - [`server`]: the axum router, its guards (Host, limits) and serving with graceful shutdown.
//! - [`broker`]: assembles config, IdP client, cache and server state.
//! - [`dev`]: the built-in development issuer behind `tokend dev`.
//! - [`commands`]: the `env`, `token` and `check` subcommands.
//! - [`signal`]: SIGTERM/SIGINT handling.
//! - [`transparent`]: transparent IMDS — serving on 169.254.169.254:80 aliased on `lo`.

pub mod broker;
pub mod commands;
pub mod config;
pub mod credential;
pub mod dev;
pub mod dialect;
pub mod identity;
pub mod idp;
pub mod reload;
pub mod resource;
pub mod server;
pub mod signal;
pub mod token;
pub mod transparent;
