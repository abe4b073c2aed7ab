//! `liminal`: PostgreSQL extension storing Liminal's facts bi-temporally,
//! ingesting them from liminald over D-Bus, and answering analytics natively.
//!
//! Module map (who owns what):
//! - `schema`    — bi-temporal tables, current-state views, AS-OF, corrections, erase (helper "extension")
//! - `ingest`    — the background worker that moves facts from the bus into the tables (helper "extension")
//! - `analytics` — causality_walk, resonance_map/pairs, test_stability[_score] (helper "analytics")

mod analytics;
mod ingest;
mod schema;

::pgrx::pg_module_magic!();

/// Called when the library is loaded. Registers the GUCs everywhere, and the
/// ingest worker only while `shared_preload_libraries` is being processed
/// (a background worker can only be registered then).
#[allow(non_snake_case)]
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    ingest::init();
    analytics::init();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // Preloaded as in production, so the ingest worker is registered; it
        // waits (there is no liminald on this cluster's bus) without harm.
        vec!["shared_preload_libraries = 'liminal'"]
    }
}
