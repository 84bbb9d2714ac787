//! istio-iptables: a drop-in replacement for Istio's istio-iptables.
//!
//! Data flows one way, one folder per step:
//!
//! 1. [`cli`]: clap flags and env vars, nothing else.
//! 2. [`config`]: raw strings → one typed, validated [`config::Config`] (value parsers, `@PATH`
//!    lists in [`config::listfile`]), pure; then, in the target namespace, one step reads
//!    what the rules need to know about the host: [`config::HostFacts::detect`].
//! 3. [`model`]: the data every later step speaks: families, tables, rules (and their
//!    matches and target, read once as a `RuleSpec`), chain names.
//! 4. [`rules`]: the pure builders, config + host facts → rules: iptables ([`rules::build`], Istio's
//!    `run.go`), native nftables ([`rules::nft`]) and the `ip` plumbing ([`rules::ip`]).
//! 5. [`render`]: rules → text: the iptables-restore payload ([`render::restore`]) and the
//!    `--dry-run` script ([`render::script`]).
//! 6. [`system`]: everything that touches the host: running programs ([`system::exec`]),
//!    backend detection ([`system::backend`]), netlink reads ([`system::nftprobe`],
//!    [`system::rtnl`]), namespaces and locks ([`system::netns`], [`system::nslock`]), users
//!    and addresses ([`system::host`]), and iptables-save parsing ([`system::save`]).
//! 7. [`apply`]: read the state, work out one transaction ([`apply::reconcile`]), commit, roll
//!    back, then the `ip` steps; cleanup.
//!
//! Beside the flow: [`inspect`] (`explain` and `verify`, walking packets with
//! [`inspect::interp`]), [`validate`] (`--run-validation`), [`logging`] (Istio's log
//! formats) and [`cli::docs`] (completion and man page, generated from [`cli`]).

pub mod backend;
pub mod cli;
pub mod commands;
pub mod config;
pub mod logging;
pub mod model;
pub mod routes;
pub mod system;
