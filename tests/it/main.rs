//! Integration tests: the real server over TCP, on SQLite by default and on PostgreSQL when
//! `TEST_POSTGRES_URL` is set (each test in its own schema).

mod support;

mod auth;
mod binary;
mod deploy;
mod fake_stripe;
mod http;
mod shutdown;
mod store;
mod stripe;
mod tls;
