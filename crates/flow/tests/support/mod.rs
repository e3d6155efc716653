//! What the flow tests share: a database of each test's own on the PostgreSQL
//! server `scripts/test` started.

#![allow(unused_imports)] // each test file uses its own part

pub use palisade_testkit::{env, fresh_db, fresh_pool, unique};
