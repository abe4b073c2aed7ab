//! Schema `liminal`: bi-temporal version tables, current-state views,
//! AS-OF functions, corrections and erase. The DDL lives in `schema.sql`
//! (read its header for the versioning rules); the SQL-level functions in
//! `functions.sql`.

use pgrx::prelude::*;

pgrx::extension_sql_file!("schema.sql", name = "liminal_schema", bootstrap);
pgrx::extension_sql_file!(
    "functions.sql",
    name = "liminal_functions",
    requires = ["liminal_schema", new_ulid]
);

// 0.2.0's changes (among them the reproducibility views), shared with the
// upgrade script so both paths agree.
#[cfg(not(feature = "v0_1"))]
pgrx::extension_sql_file!(
    "../../sql/liminal--0.1.0--0.2.0.sql",
    name = "liminal_v0_2_0",
    requires = ["liminal_functions"]
);

/// A fresh ULID as text: fact ids for versions the database asserts itself
/// (corrections).
#[pg_extern(volatile, parallel_safe)]
fn new_ulid() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(any(test, feature = "pg_test"))]
mod repro_tests;
#[cfg(any(test, feature = "pg_test"))]
mod tests;
