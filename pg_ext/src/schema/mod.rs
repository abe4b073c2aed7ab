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

/// A fresh ULID as text: fact ids for versions the database asserts itself
/// (corrections).
#[pg_extern(volatile, parallel_safe)]
fn new_ulid() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn schema_views_exist() {
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_views WHERE schemaname = 'liminal' \
             AND viewname IN ('runs','test_results','signals','artifacts','ingest_status')",
        );
        assert_eq!(n, Ok(Some(5)));
    }
}
