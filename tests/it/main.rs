//! Integration tests: the real server over TCP, on SQLite by default and on PostgreSQL when
//! `TEST_POSTGRES_URL` is set (each test in its own schema).

mod process;
mod support;

mod auth;
mod binary;
mod catalogue_writers;
mod cli;
mod cors;
mod crash;
mod deploy;
mod drill;
mod fake_stripe;
mod fake_twilio;
mod h2c;
mod hostile;
mod http;
mod legacy_usage;
mod linger;
mod logs;
mod openapi;
mod outage;
mod pg_locks;
mod reconcile;
mod restore;
mod retention;
mod runbook;
mod shutdown;
mod sms;
mod store;
mod stripe;
mod tls;
mod traces;
