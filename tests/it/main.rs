//! Integration tests: the real server over TCP, on SQLite by default and on PostgreSQL when
//! `TEST_POSTGRES_URL` is set (each test in its own schema).

mod process;
mod support;

mod auth;
mod binary;
mod cli;
mod deploy;
mod drill;
mod fake_stripe;
mod fake_twilio;
mod http;
mod openapi;
mod runbook;
mod shutdown;
mod sms;
mod store;
mod stripe;
mod tls;
