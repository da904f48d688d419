//! The admin API suite (`admin_api/suite.rs`) on PostgreSQL: every test starts its own
//! private PostgreSQL server (`charter_store::testing::TestPostgres`), which lives as long
//! as the test's control plane.

use charter_tests::Backend;

/// The backend the suite runs on.
const BACKEND: Backend = Backend::Postgres;

#[path = "admin_api/suite.rs"]
mod suite;
