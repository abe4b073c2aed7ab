//! The run engine: a validated plan in, facts out.
//!
//! Module map (each has one job):
//! - [`image`]: resolve a plan's image to a rootfs folder and its digest
//!   (OCI layouts are unpacked once, cached by manifest digest).
//! - [`digest`]: the input digest (canonical plan, image digest, input mount
//!   content digests, sandbox configuration).
//! - [`secrets`]: secrets into sealed, read-only memfds.
//! - [`job`]: the protocol between the engine and the `liminal-sandbox` helper.
//! - [`prefork`]: the warm helper (a fork server kept between runs).
//! - [`runner`]: spawns the helper, reads output while it runs, enforces the
//!   timeout and cancellation, cleans up on every path, emits facts.
//! - [`signals`]: captured lines and `LIMINAL_SIGNALS_FD` JSON lines into
//!   signals; secret masking.
//! - [`results`]: JUnit XML and TAP reports into test results.
//! - [`artifacts`]: globbing, BLAKE3 hashing and the content-addressed store.
//! - [`repro`]: reproducibility verification: builds under variations,
//!   comparison by BLAKE3, culprit search.
//!
//! This crate must not depend on libcontainer (see DESIGN.md: container work
//! never runs inside the multi-threaded daemon).

pub mod artifacts;
pub mod digest;
pub mod image;
pub mod job;
pub mod prefork;
pub mod repro;
pub mod results;
pub mod runner;
pub mod secrets;
pub mod signals;
pub mod tree_memo;

pub use runner::{
    cleanup_orphans, run, CancelHandle, CleanupReport, EngineConfig, EngineError, RunOutcome,
    RunRequest, SandboxVariation, TestSummary,
};
