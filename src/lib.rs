//! istio-iptables: a drop-in replacement for Istio's istio-iptables.
//!
//! One run flows one way: [`cli`] parses, [`config`] validates into one
//! [`config::Config`], `main` chooses the backend once ([`backend::Backend`]:
//! [`backend::iptables`] or [`backend::nft`]) and runs one of the [`commands`], which use
//! the backends, the shared `ip` steps of [`routes`], and [`system`] (the only part that
//! touches the host). [`model`] is the vocabulary all of them speak; [`logging`] writes
//! Istio's log formats. ARCHITECTURE.md at the repository's root maps the folders and who may
//! import whom.

pub mod backend;
pub mod cli;
pub mod commands;
pub mod config;
pub mod logging;
pub mod model;
pub mod routes;
pub mod system;
