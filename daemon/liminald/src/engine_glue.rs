//! The daemon's view of the engine (CONTRACTS: `liminal_engine::run`,
//! `cleanup_orphans`, `EngineConfig`, `CancelHandle`), in one place so
//! liminald and `limctl run --local` use the same names.

pub use liminal_engine::{cleanup_orphans, run, CancelHandle, EngineConfig, RunRequest};
