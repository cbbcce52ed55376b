//! Keys and tokens for `bench/load.sh`.
//!
//! `cargo run --release --example bench_tokens -- OUT_DIR ISSUER LEGACY_SECRET [COUNT [FRESH
//! [LARGE]]]`
//! writes into OUT_DIR:
//! - `jwks.json`: the public ES256, RS256 and EdDSA keys, as the JWKS host serves them;
//! - `es256.txt`, `hs256.txt`, `rs256.txt`: COUNT (default 2000) distinct tokens each, one a line;
//! - `es256_fresh.txt`: FRESH (default 60000) distinct ES256 tokens, none of them in
//!   `es256.txt`, enough that none comes round again while the verified-token cache holds it,
//!   so each one costs a signature check; `rs256_fresh.txt`, `eddsa_fresh.txt` and
//!   `hs256_fresh.txt` likewise for RS256, EdDSA and the legacy secret;
//! - `es256_one.txt`: a single ES256 token (the repeated-token scenario);
//! - `random_kid.txt`: COUNT ES256 tokens, each under a fresh kid that no JWKS holds;
//! - `hs256_large_fresh.txt`, when LARGE (default 0) is given: LARGE distinct legacy tokens
//!   whose `user_metadata` (the user's own to fill) makes them nearly as long as a token may
//!   be (8 KiB), for the verified-token cache's memory (`bench/rss.sh`).
//!
//! Tokens are valid for two hours from now, shaped like Supabase Auth's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use edgegate::auth::Alg;
use edgegate::auth::mint::{SigningKey, legacy_token, user_claims};
use serde_json::json;

const TTL_SECS: i64 = 2 * 60 * 60;

fn write_lines(dir: &Path, name: &str, tokens: &[String]) -> anyhow::Result<()> {
    let mut text = String::new();
    for token in tokens {
        writeln!(text, "{token}")?;
    }
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_tokens OUT_DIR ISSUER LEGACY_SECRET [COUNT [FRESH [LARGE]]]";
    let dir = PathBuf::from(args.next().context(usage)?);
    let issuer = args.next().context(usage)?;
    let secret = args.next().context(usage)?;
    let count: usize = match args.next() {
        Some(n) => n.parse().context("COUNT must be a number")?,
        None => 2000,
    };
    let fresh: usize = match args.next() {
        Some(n) => n.parse().context("FRESH must be a number")?,
        None => 60_000,
    };
    let large: usize = match args.next() {
        Some(n) => n.parse().context("LARGE must be a number")?,
        None => 0,
    };
    anyhow::ensure!(count >= 1, "COUNT must be at least 1");
    std::fs::create_dir_all(&dir).context("creating OUT_DIR")?;

    let now = edgegate::clock::Clock::system().unix_now();
    let claims = |i: usize| {
        user_claims(
            &issuer,
            "authenticated",
            &format!("user-{i}"),
            now,
            TTL_SECS,
        )
    };
    let es256 = SigningKey::generate(Alg::ES256)?;
    let rs256 = SigningKey::generate(Alg::RS256)?;
    let eddsa = SigningKey::generate(Alg::EdDSA)?;
    let sign = |key: &SigningKey, count: usize| -> anyhow::Result<Vec<String>> {
        (0..count).map(|i| key.token(&claims(i))).collect()
    };

    let jwks = json!({"keys": [es256.public_jwk(), rs256.public_jwk(), eddsa.public_jwk()]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).context("writing jwks.json")?;
    // A fresh set shares no token with the cache-hit sets, whose tokens a fresh run would
    // otherwise find in the cache.
    let es256_tokens = sign(&es256, count + fresh)?;
    write_lines(&dir, "es256.txt", &es256_tokens[..count])?;
    write_lines(&dir, "es256_fresh.txt", &es256_tokens[count..])?;
    write_lines(&dir, "es256_one.txt", &es256_tokens[..1])?;
    let rs256_tokens = sign(&rs256, count + fresh)?;
    write_lines(&dir, "rs256.txt", &rs256_tokens[..count])?;
    write_lines(&dir, "rs256_fresh.txt", &rs256_tokens[count..])?;
    write_lines(&dir, "eddsa_fresh.txt", &sign(&eddsa, fresh)?)?;
    let legacy: Vec<String> = (0..count + fresh)
        .map(|i| legacy_token(secret.as_bytes(), &claims(i), None))
        .collect();
    write_lines(&dir, "hs256.txt", &legacy[..count])?;
    write_lines(&dir, "hs256_fresh.txt", &legacy[count..])?;
    // Each under its own unknown kid: what an attacker sends to force JWKS refetches.
    let random_kid = (0..count)
        .map(|i| SigningKey::generate(Alg::ES256)?.token(&claims(i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_lines(&dir, "random_kid.txt", &random_kid)?;
    if large > 0 {
        // 5,800 bytes of claims: 7.9 KiB of token once in base64url, signed.
        let tokens: Vec<String> = (0..large)
            .map(|i| {
                let mut claims = claims(i);
                claims["user_metadata"] = json!({"bio": ""});
                let pad = 5_800usize.saturating_sub(claims.to_string().len());
                claims["user_metadata"]["bio"] = json!("x".repeat(pad));
                legacy_token(secret.as_bytes(), &claims, None)
            })
            .collect();
        write_lines(&dir, "hs256_large_fresh.txt", &tokens)?;
    }
    println!("{count} tokens per set written to {}", dir.display());
    Ok(())
}
