//! fly.toml agrees with the code: the port, the release command, the kill timeout.

use edgegate::config::{DEFAULT_PORT, DEFAULT_SHUTDOWN_DRAIN};

fn fly() -> toml::Table {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fly.toml");
    std::fs::read_to_string(path)
        .unwrap()
        .parse()
        .expect("fly.toml is TOML")
}

#[test]
fn fly_toml_serves_the_default_port() {
    let fly = fly();
    let port = fly["http_service"]["internal_port"].as_integer().unwrap();
    assert_eq!(port, i64::from(DEFAULT_PORT));
    assert_eq!(
        fly["env"]["PORT"].as_str(),
        Some(DEFAULT_PORT.to_string().as_str())
    );
}

#[test]
fn fly_toml_migrates_before_a_rolling_deploy() {
    let fly = fly();
    let deploy = &fly["deploy"];
    // Fly replaces the image's CMD with release_command and keeps ENTRYPOINT ["edgegate"].
    assert_eq!(deploy["release_command"].as_str(), Some("migrate"));
    assert_eq!(deploy["strategy"].as_str(), Some("rolling"));
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"ENTRYPOINT ["edgegate"]"#));
}

#[test]
fn fly_toml_lets_the_drain_finish() {
    let fly = fly();
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));
    let kill_timeout = fly["kill_timeout"].as_integer().unwrap();
    // The drain, the service's last steps, and the exit (the last spans and log lines), each
    // bounded by its deadline, and the process's own end.
    let stop = DEFAULT_SHUTDOWN_DRAIN
        + edgegate::AFTER_DRAIN
        + edgegate::telemetry::EXIT_AFTER_STOP
        + std::time::Duration::from_millis(500);
    assert!(
        std::time::Duration::from_secs(kill_timeout as u64) >= stop,
        "{kill_timeout} s < {stop:?}"
    );
}

#[test]
fn fly_toml_checks_healthz_as_https() {
    let fly = fly();
    let checks = fly["http_service"]["checks"].as_array().unwrap();
    let check = checks
        .iter()
        .find(|check| check["path"].as_str() == Some("/healthz"))
        .expect("an HTTP check on /healthz");
    assert_eq!(
        check["headers"]["X-Forwarded-Proto"].as_str(),
        Some("https")
    );
    assert_eq!(
        fly["http_service"]["concurrency"]["type"].as_str(),
        Some("requests")
    );
}

/// Someone deploying from a clone has the repository, not the contract: every variable the code
/// reads is in docs/CONFIGURATION.md.
#[test]
fn every_variable_the_code_reads_is_documented() {
    let root = env!("CARGO_MANIFEST_DIR");
    let documented = std::fs::read_to_string(format!("{root}/docs/CONFIGURATION.md")).unwrap();
    let mut read = std::collections::BTreeSet::new();
    for file in ["src/config/mod.rs", "src/config/parse.rs", "src/main.rs"] {
        let code = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        // Every string literal that is a variable's name: upper case, digits and `_`.
        for literal in code.split('"').skip(1).step_by(2) {
            let name_like = literal.len() >= 4
                && literal
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && (literal.contains('_') || ["PORT", "HOST"].contains(&literal));
            if name_like && literal != "CARGO_PKG_VERSION" {
                read.insert(literal.to_owned());
            }
        }
    }
    assert!(read.len() > 50, "{read:?}");
    let missing: Vec<_> = read
        .iter()
        .filter(|name| !documented.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/CONFIGURATION.md: {missing:?}"
    );
}

/// The configuration fuzz target (fuzz/fuzz_targets/config.rs) fuzzes every variable the
/// configuration parser reads: a variable added to the parser and not to the target would have
/// its rules, and the secrecy of its value, go unfuzzed.
#[test]
fn the_config_fuzz_target_covers_every_variable_the_parser_reads() {
    let root = env!("CARGO_MANIFEST_DIR");
    let target = std::fs::read_to_string(format!("{root}/fuzz/fuzz_targets/config.rs")).unwrap();
    let listed = target
        .split("const VARIABLES")
        .nth(1)
        .and_then(|rest| rest.split("];").next())
        .expect("the target's VARIABLES list");
    let mut missing = std::collections::BTreeSet::new();
    for file in ["src/config/mod.rs", "src/config/parse.rs"] {
        let code = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        for literal in code.split('"').skip(1).step_by(2) {
            let name_like = literal.len() >= 4
                && literal.contains('_')
                && literal
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if name_like && !listed.contains(&format!("\"{literal}\"")) {
                missing.insert(literal.to_owned());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "read by the configuration, not fuzzed: {missing:?}"
    );
}
