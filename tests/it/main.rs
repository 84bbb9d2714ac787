//! The integration tests: one test crate (`it`), one module per subject, linked once.
//!
//! Root tests are `#[ignore = "needs root and network namespaces"]` and create their own
//! namespaces; run everything with `cargo test -- --include-ignored`, one module with
//! `cargo test --test it MODULE:: -- --include-ignored` (`cargo test --test it apply::`).
//! The helpers all modules share are in `common/`; the conformance data in `tests/data/`;
//! insta's snapshots in `snapshots/` (named `it__snapshots__<name>.snap`, after the module
//! path `it::snapshots`).

mod apply;
mod cli;
mod cli_extras;
mod common;
mod conformance;
mod conformance_nft;
mod doctor;
mod door;
mod exclusion_sets;
mod explain;
mod explain_live;
mod fuzz;
// The release image: its root filesystem holds the static musl build (tests/it/image.rs).
#[cfg(all(target_env = "musl", target_arch = "x86_64"))]
mod image;
mod inspect_nft;
mod inspect_shadow;
mod istio_injector;
mod logs;
mod nft_names;
mod scripts;
mod snapshots;
mod traffic;
