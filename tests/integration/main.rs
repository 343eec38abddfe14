//! Integration tests: the real `tokend` binary against the real test IdP (npm `oidc-provider`, see
//! tests/idp) over real sockets, and real Azure SDK clients (Python azure-identity) against `tokend`.

// Helpers are `pub` for the sibling test modules of this one binary.
#![allow(unreachable_pub)]

mod audit;
mod azcli;
mod azureml;
mod callers;
mod cli;
mod clients;
mod container;
mod contract;
mod credentials;
mod failures;
mod flood;
mod hostile;
mod layers;
mod limits;
mod netns;
mod operations;
mod pkcs11;
mod readme;
mod refresh;
mod reload;
mod secrecy;
mod serving;
mod soak;
mod support;
mod systemd;
mod transparent;
mod upstream;
