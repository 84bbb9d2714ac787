//! istio-iptables: a drop-in replacement for Istio's istio-iptables.
//!
//! Data flows one way: [`cli`] (flags and env) → [`config`] (typed, validated) → [`rules`]
//! (pure rule builder) → [`restore`] / [`script`] (payload text, dry-run script) → [`apply`]
//! (detect with [`backend`], read with [`state`], plan one transaction with [`reconcile`],
//! commit and roll back through [`exec`], `ip` plumbing in [`iproute`]) → [`validate`].
//! [`inspect`] (`explain`, `verify`) reads the same rules back, walking packets with
//! [`interp`].

pub mod apply;
pub mod backend;
pub mod cli;
pub mod config;
pub mod docs;
pub mod exec;
pub mod host;
pub mod inspect;
pub mod interp;
pub mod iproute;
pub mod listfile;
pub mod logging;
pub mod netns;
pub mod nft;
pub mod nftprobe;
pub mod nslock;
pub mod reconcile;
pub mod restore;
pub mod rtnl;
pub mod rules;
pub mod script;
pub mod state;
pub mod validate;
