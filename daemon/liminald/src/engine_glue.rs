//! The daemon's view of the engine (`liminal_engine::run`,
//! `cleanup_orphans`, `EngineConfig`, `CancelHandle`), in one place.

pub use liminal_engine::{cleanup_orphans, run, CancelHandle, EngineConfig, RunRequest};
