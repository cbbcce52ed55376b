//! A database as a backup and restore can leave it: files owned by another user than the one
//! edgegate runs as, an empty file, a database a newer build migrated. What `serve`, `migrate`
//! and `check` make of each, run as an operator runs them.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use crate::process::{BIN, edgegate, free_port, output, signal, wait_exit, wait_healthy};
use crate::support::{TestDb, in_ci, skipped};

/// The user the image runs edgegate as.
const IMAGE_UID: u32 = 10001;

/// A copy of the binary in `dir` (a hard link where it can be), which any user may reach: the
/// build's own folder may sit in a home no other user may enter. `dir` itself is opened to all.
fn binary_for_anyone(dir: &Path) -> std::path::PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("edgegate");
    if std::fs::hard_link(BIN, &bin).is_err() {
        std::fs::copy(BIN, &bin).unwrap();
    }
    bin
}

/// `setpriv`'s arguments that run a program as [`IMAGE_UID`], as the image's `USER` does.
fn setpriv_as_image_user(command: &mut Command) {
    let uid = IMAGE_UID.to_string();
    command.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"]);
}

/// Whether `bin` can be run as [`IMAGE_UID`] here: asked before the test gives anything to that
/// user (which needs root too). Not where this process cannot change its user (not root): then
/// a notice the test's output shows, and a failure under `CI=true`. Root reads and writes any
/// file whatever its mode, so the files' owners and modes are only tested by another user.
fn image_user_can_run(bin: &Path) -> bool {
    let mut probe = Command::new("setpriv");
    setpriv_as_image_user(&mut probe);
    let probed = probe.arg(bin).arg("--version").output();
    if probed.as_ref().is_ok_and(|out| out.status.success()) {
        return true;
    }
    let why = format!("{probed:?}");
    assert!(
        !in_ci(),
        "CI=true and edgegate cannot be run as uid {IMAGE_UID}: {why}"
    );
    skipped(&format!(
        "edgegate cannot be run as uid {IMAGE_UID} here (needs root): {why}"
    ));
    false
}

/// `bin` run as [`IMAGE_UID`] (see [`image_user_can_run`]), with a clean environment plus
/// `vars`, and stopped after 30 s, killed 5 s later (a `serve` that starts by mistake ends, and
/// so does one held in a system call, which a TERM does not end).
fn as_image_user(dir: &Path, bin: &Path, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new("timeout");
    command.args(["--kill-after=5", "30", "setpriv"]);
    setpriv_as_image_user(&mut command);
    command.arg(bin);
    let template = edgegate(dir, vars);
    command.env_clear().current_dir(dir);
    for (name, value) in template.get_envs() {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// A temporary folder holding a copy of the binary the image's user may run, and in it a folder
/// `name` owned by `owner`; `None` (the test skips, loudly, or fails under `CI=true`) where this
/// process cannot run a command as that user.
fn folder_for_the_image_user(
    name: &str,
    owner: u32,
) -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for_anyone(dir.path());
    if !image_user_can_run(&bin) {
        return None;
    }
    let data = dir.path().join(name);
    std::fs::create_dir(&data).unwrap();
    chown(&data, owner);
    Some((dir, bin, data))
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// The `database` line of `check`'s stdout.
fn database_line(stdout: &str) -> String {
    stdout
        .lines()
        .find(|line| line.contains(" database "))
        .unwrap_or_else(|| panic!("no database line: {stdout}"))
        .to_owned()
}

/// A restored SQLite file (and a `-wal` and `-shm` beside it) owned by root while edgegate runs
/// as uid 10001, in a directory it may write: `serve`, `migrate` and `check` name each file it
/// cannot open for reading and writing, say why (the system's own error) and what to run. A
/// file it could not read stopped start-up with SQLite's bare "(code: 14) unable to open
/// database file"; one it could read but not write (mode 0644, say) was served read-only, every
/// write failing with "attempt to write a readonly database".
#[tokio::test]
async fn files_of_another_user_are_named_with_the_command_that_gives_them_back() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let file = data.join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    // Restored by root: a database migrated, the files its own.
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let path_of = |suffix: &str| format!("{}{suffix}", file.display());
    let run = |command: &str| {
        let mut child = as_image_user(dir.path(), &bin, &vars);
        output(child.arg(command))
    };

    for mode in [0o600, 0o644] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        // `check` run as root (as `fly ssh console` runs it) judges the files for the user serve
        // runs as, the directory's owner: root may open them, and it said ok.
        let out = output(edgegate(dir.path(), &vars).arg("check"));
        let line = database_line(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(1), "root, mode {mode:o}: {line}");
        assert!(
            line.starts_with("FAIL")
                && line.contains(&format!("{} is owned by uid 0", file.display()))
                && line.contains(&format!("uid {IMAGE_UID}"))
                && line.contains(&format!("chown {IMAGE_UID}:{IMAGE_UID} {}", file.display())),
            "root, mode {mode:o}: {line}"
        );
        for command in ["serve", "migrate"] {
            let out = run(command);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{command}, mode {mode:o}: {stderr}"
            );
            assert!(
                stderr.contains(&format!("{} is owned by uid 0", file.display()))
                    && stderr.contains("Permission denied")
                    && stderr
                        .contains(&format!("chown {IMAGE_UID}:{IMAGE_UID} {}", file.display())),
                "{command}, mode {mode:o}: {stderr}"
            );
        }
        let out = run("check");
        let line = database_line(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(1), "{line}");
        assert!(
            line.starts_with("FAIL")
                && line.contains(&format!("{} is owned by uid 0", file.display()))
                && line.contains("Permission denied"),
            "mode {mode:o}: {line}"
        );
    }

    // The database given back, a -wal and a -shm of root's left beside it (one unreadable, one
    // read-only to others): both named.
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    for (suffix, mode) in [("-wal", 0o600), ("-shm", 0o644)] {
        std::fs::write(path_of(suffix), b"").unwrap();
        chown(Path::new(&path_of(suffix)), 0);
        std::fs::set_permissions(path_of(suffix), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = run("serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for suffix in ["-wal", "-shm"] {
        assert!(
            stderr.contains(&format!("{} is owned by uid 0", path_of(suffix))),
            "{suffix}: {stderr}"
        );
    }
    assert!(
        !stderr.contains(&format!("{} is owned", file.display())),
        "{stderr}"
    );
    let out = run("check");
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL") && line.contains(&path_of("-wal")),
        "{line}"
    );

    // The database not restored yet, root's -wal and -shm still there: serve would stop on the
    // -shm. Not on the -wal, which SQLite deletes beside a database with no pages (it needs
    // only the directory for that): check failed on it.
    let aside = data.join("aside.db");
    std::fs::rename(&file, &aside).unwrap();
    let out = run("check");
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL")
            && line.contains("not there")
            && line.contains(&format!("{} is owned by uid 0", path_of("-shm")))
            && !line.contains(&path_of("-wal")),
        "{line}"
    );
    chown(Path::new(&path_of("-shm")), IMAGE_UID);
    let out = run("check");
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok") && line.contains("not there yet"),
        "{line}"
    );
    chown(Path::new(&path_of("-shm")), 0);
    std::fs::rename(&aside, &file).unwrap();

    // The advice followed: served.
    for suffix in ["-wal", "-shm"] {
        chown(Path::new(&path_of(suffix)), IMAGE_UID);
    }
    let mut serve = as_image_user(dir.path(), &bin, &vars);
    serve.arg("serve");
    let mut server = crate::process::spawn_logged(serve, dir.path(), "server.log");
    let healthy = wait_healthy(port.parse().unwrap()).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "not serving once the files were given back: {log}");
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{log}");
    signal(&server, "TERM");
    wait_exit(&mut server).await;
}

/// The migration lock a `migrate` run as root left (root's, mode 0644) beside a database given
/// back to uid 10001: what never opens it (`serve --no-migrate`, `check`, `keys report`) works
/// as that user, where all three refused the lock; a migration names it with the chown that
/// gives it back. A `migrate` run as root gives the lock it makes, and one of root's it finds
/// (see [`a_migration_lock_an_older_root_migrate_left_is_given_back`]), to the database file's
/// owner, as SQLite does its -wal and -shm, and uid 10001 migrates again.
#[tokio::test]
async fn a_migration_lock_root_left_stops_only_a_migration() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let file = data.join("edgegate.db");
    let lock = data.join("edgegate.db.migrate-lock");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    // As a root `migrate` of the build before left it.
    chown(&lock, 0);
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |args: &[&str]| {
        let out = output(as_image_user(dir.path(), &bin, &vars).args(args));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };

    let (code, stdout, _) = run(&["check"]);
    let line = database_line(&stdout);
    assert!(line.starts_with("ok"), "{code:?}: {line}");
    let (code, _, stderr) = run(&["keys", "report"]);
    assert_eq!(code, Some(0), "{stderr}");
    let mut serve = as_image_user(dir.path(), &bin, &vars);
    serve.args(["serve", "--no-migrate"]);
    let mut server = crate::process::spawn_logged(serve, dir.path(), "server.log");
    let healthy = wait_healthy(port.parse().unwrap()).await;
    signal(&server, "TERM");
    wait_exit(&mut server).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "serve --no-migrate refused the lock: {log}");

    let (code, _, stderr) = run(&["migrate"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is owned by uid 0", lock.display()))
            && stderr.contains("Permission denied")
            && stderr.contains(&format!("chown {IMAGE_UID}:{IMAGE_UID} ")),
        "{stderr}"
    );

    // Root's migrate gives the lock root left (a regular file of root's, one link) to the
    // database file's owner, as it gives the one it makes.
    use std::os::unix::fs::MetadataExt as _;
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(std::fs::metadata(&lock).unwrap().uid(), IMAGE_UID);
    let (code, _, stderr) = run(&["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_file(&lock).unwrap();
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(std::fs::metadata(&lock).unwrap().uid(), IMAGE_UID);
    let (code, _, stderr) = run(&["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");
}

/// A `DATABASE_URL` that names a symbolic link: SQLite keeps the -wal and -shm beside the link's
/// target, where the files are now judged (they were looked for beside the link, and `check`,
/// run as root, judged them for the owner of the link's directory): root's -shm beside the
/// target fails `check`, and an empty target's -wal is named there.
#[tokio::test]
async fn a_symlinked_database_is_judged_beside_its_target() {
    let Some((dir, _bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let target = data.join("edgegate.db");
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let url = format!("sqlite://{}", link.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    let shm = data.join("edgegate.db-shm");
    std::fs::write(&shm, b"").unwrap();
    std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!("{} is owned by uid 0", shm.display()))
            && line.contains(&format!("chown {IMAGE_UID}:{IMAGE_UID} ")),
        "{line}"
    );
    std::fs::remove_file(&shm).unwrap();

    std::fs::write(&target, b"").unwrap();
    let wal = data.join("edgegate.db-wal");
    std::fs::write(&wal, vec![0x37; 512]).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL")
            && line.contains("exists but is empty")
            && line.contains(&format!("{} holds 512 bytes", wal.display())),
        "{line}"
    );
}

/// The advice names each file by its absolute path, quoted for a shell: the image's default
/// `sqlite://edgegate.db` is relative to /data, and `chown 10001:10001 edgegate.db` run from another
/// directory (a console's) gives nothing back, or a path with a space in it two wrong ones. A
/// directory where the database file should be, and a filesystem mounted read-only, are said to
/// be what they are: `chmod 600` was advised for both.
#[tokio::test]
async fn the_advice_fits_the_file_and_names_it_as_a_shell_takes_it() {
    let Some((dir, _bin, data)) = folder_for_the_image_user("my data", IMAGE_UID) else {
        return;
    };
    let vars = [("DATABASE_URL", "sqlite://my data/edgegate.db")];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    // Root's files, judged by check run as root for uid 10001.
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    let absolute = std::fs::canonicalize(&data).unwrap().join("edgegate.db");
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "chown {IMAGE_UID}:{IMAGE_UID} '{}'",
                absolute.display()
            ))
            && line.contains(&format!("chmod 600 '{}'", absolute.display())),
        "{line}"
    );

    // A directory where the file should be.
    let directory = dir.path().join("edgegate.db");
    std::fs::create_dir(&directory).unwrap();
    let vars = [("DATABASE_URL", "sqlite://edgegate.db")];
    for command in ["check", "migrate"] {
        let out = output(edgegate(dir.path(), &vars).arg(command));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{command}: {said}");
        assert!(
            said.contains(&format!("{} is a directory", directory.display()))
                && !said.contains("chmod"),
            "{command}: {said}"
        );
    }

    // A filesystem mounted read-only.
    let mount = dir.path().join("ro");
    let Some(_tmpfs) = crate::outage::Tmpfs::mount(&mount, "size=8m") else {
        return;
    };
    let url = format!("sqlite://{}", mount.join("edgegate.db").display());
    let vars = [("DATABASE_URL", url.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mount)
        .output()
        .unwrap();
    assert!(remounted.status.success(), "{remounted:?}");
    for command in ["check", "migrate"] {
        let out = output(edgegate(dir.path(), &vars).arg(command));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{command}: {said}");
        assert!(
            said.contains("Read-only file system")
                && said.contains("mounted read-only")
                && !said.contains("chmod")
                && !said.contains("chown"),
            "{command}: {said}"
        );
    }
}

/// Marks `versions` applied in the database at `url`, as a newer release's migrations are.
async fn apply_later_migrations(db: &TestDb, versions: &[i64]) {
    use sqlx::Connection as _;
    let later = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES ($1, 'a later release', TRUE, {bytes}, 0)";
    for &version in versions {
        if db.is_postgres() {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let sql = later.replace("{bytes}", "decode('00', 'hex')");
            let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(version);
            query.execute(&mut conn).await.unwrap();
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let sql = later.replace("{bytes}", "X'00'");
            let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(version);
            query.execute(&mut conn).await.unwrap();
        }
    }
}

/// A database a newer release migrated (a rollback, DEPLOY.md §6, or a backup restored into an
/// older build) is served, as it is meant to be, but no longer without a word: `serve` warns once
/// at start, with or without migrating, how many applied migrations this build does not know and
/// the newest, and `check`'s database line says it (still ok). Both engines. A migration an
/// earlier build shipped and a later one retired (20261210000001, shipped in 3eb0f9e and
/// deleted in 0552c88), older than this build's newest, is no newer release's: it was counted,
/// and warned of on every start for good. A newer release's migration that sorts below this
/// build's newest (20261211000002, a fix made on a branch) is one: it went unwarned.
#[tokio::test]
async fn a_database_a_newer_build_migrated_is_served_with_a_warning() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.store().await.close().await;
    let retired = 20261210000001;
    let interleaved = 20261211000002;
    apply_later_migrations(&db, &[retired, interleaved, 99990101000000, 99990102000000]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", db.url.as_str()), ("PORT", port.as_str())];

    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok")
            && line.contains("3 of them unknown to this build (the newest 99990102000000)")
            && line.contains("DEPLOY.md"),
        "{line}"
    );

    for args in [&["serve"][..], &["serve", "--no-migrate"]] {
        let mut command = edgegate(dir.path(), &vars);
        command.args(args);
        let mut server = crate::process::spawn_logged(command, dir.path(), "server.log");
        let healthy = wait_healthy(port.parse().unwrap()).await;
        signal(&server, "TERM");
        wait_exit(&mut server).await;
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
        assert!(healthy, "{args:?}: {log}");
        let warned: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("this build does not know"))
            .collect();
        assert!(
            warned.len() == 1
                && warned[0].contains("WARN")
                && warned[0].contains("3 applied migrations this build does not know")
                && warned[0].contains("99990102000000")
                && warned[0].contains("DEPLOY.md"),
            "{args:?}: {log}"
        );
    }
}

/// `serve --no-migrate` started while the database did not answer warns of a newer build's
/// migrations once it answers, as it does when the database answers at start: it said nothing.
/// PostgreSQL (the outage is a proxy that closes every connection, then forwards them).
#[tokio::test]
async fn serve_no_migrate_warns_of_a_newer_build_once_the_database_answers() {
    let db = crate::postgres_db!();
    db.store().await.close().await;
    apply_later_migrations(&db, &[99990101000000]).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let target = std::net::SocketAddr::new(
        url.host_str().unwrap().parse().expect("an IP address"),
        url.port().unwrap_or(5432),
    );
    let proxy = crate::outage::PgProxy::start(target).await;
    proxy.cut();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let mut command = edgegate(dir.path(), &vars);
    command.args(["serve", "--no-migrate"]);
    let mut server = crate::process::spawn_logged(command, dir.path(), "server.log");
    let healthy = wait_healthy(port.parse().unwrap()).await;
    let log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "{}", log());
    proxy.restore();
    let warned = |log: &str| {
        log.lines()
            .filter(|line| line.contains("this build does not know"))
            .count()
    };
    // Read every 3 s once the database answers (and each connection attempt waits a little).
    for _ in 0..100 {
        if warned(&log()) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Read again at least once more: said once.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    signal(&server, "TERM");
    wait_exit(&mut server).await;
    let log = log();
    assert_eq!(warned(&log), 1, "{log}");
}

/// `serve --no-migrate` whose reading of the applied migrations succeeds at start warns of a
/// newer build's, even where a second reading of them would fail: it read them twice (how many
/// of its own are missing, then which it does not know), and a failure of the second after a
/// first that found none missing left nothing to read them again, so the warning never came.
/// Here the second reading (in version order, through the table's index) fails for good on a
/// damaged index page that the first (a scan of the table) never reads; a passing failure (a
/// dropped connection, a busy file) met the same end. One reading now says both. SQLite only:
/// PostgreSQL offers no such difference to provoke.
#[tokio::test]
async fn serve_no_migrate_warns_of_a_newer_build_from_the_reading_that_found_none_missing() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
         execution_time) VALUES (99990101000000, 'a later release', TRUE, X'00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let index_page: i64 = sqlx::query_scalar(
        "SELECT rootpage FROM sqlite_schema WHERE name = 'sqlite_autoindex__sqlx_migrations_1'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = usize::try_from((index_page - 1) * page_size).unwrap();
    bytes[at..at + 12].fill(0xff);
    std::fs::write(&file, &bytes).unwrap();

    let mut command = edgegate(dir.path(), &vars);
    command.args(["serve", "--no-migrate"]);
    let mut server = crate::process::spawn_logged(command, dir.path(), "server.log");
    let healthy = wait_healthy(port.parse().unwrap()).await;
    let log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "{}", log());
    // Said before it listens (read at start, not by a watch).
    signal(&server, "TERM");
    wait_exit(&mut server).await;
    let log = log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("this build does not know"))
        .collect();
    assert!(
        warned.len() == 1 && warned[0].contains("99990101000000"),
        "{log}"
    );
}

/// An existing empty SQLite file (a restore that copied nothing, a truncated copy) is no longer
/// taken for a new database without a word: `serve` and `migrate` (Fly's release command, which
/// runs first) warn, naming the file, that it is set up as a new database; `check` fails its
/// database line ("exists but is empty") and leaves the file as it found it (opening it wrote
/// SQLite's header, and the next start warned of nothing); `keys report` refuses it. A file
/// edgegate creates itself is not warned of.
#[tokio::test]
async fn an_empty_database_file_is_warned_of_and_failed_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let warnings = |log: &str| {
        log.lines()
            .filter(|line| line.contains("exists but is empty"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    std::fs::write(&file, b"").unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("FAIL")
            && line.contains("exists but is empty")
            && line.contains("OPERATIONS.md"),
        "{line}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "check wrote to it"
    );
    let out = output(edgegate(dir.path(), &vars).args(["keys", "report"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exists but is empty"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "report wrote to it"
    );

    // A -wal beside it with pages in it: SQLite deletes it when it opens a file with no pages
    // (check did, and wrote a header, and the next start warned of nothing).
    let wal = format!("{}-wal", file.display());
    std::fs::write(&wal, vec![0x37; 4096]).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("FAIL")
            && line.contains("exists but is empty")
            && line.contains(&format!("{wal} holds 4096 bytes"))
            && line.contains("discards"),
        "{line}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "check wrote to it"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        vec![0x37; 4096],
        "check changed the -wal"
    );
    // serve and migrate refuse to start on it: they warned to copy the -wal aside, and SQLite
    // deleted it in the same run.
    for command in ["migrate", "serve"] {
        let out = output(edgegate(dir.path(), &vars).arg(command));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string())
                && stderr.contains(&format!("{wal} holds 4096 bytes"))
                && stderr.contains("restore again")
                && stderr.contains("delete both"),
            "{command}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&wal).unwrap(),
            vec![0x37; 4096],
            "{command} changed the -wal"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "{command}");
    }
    std::fs::remove_file(&wal).unwrap();

    for command in ["migrate", "serve"] {
        std::fs::write(&file, b"").unwrap();
        for stale in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{stale}", file.display()));
        }
        let log = if command == "migrate" {
            let out = output(edgegate(dir.path(), &vars).arg("migrate"));
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        } else {
            let mut server = crate::process::spawn_server(dir.path(), "server.log", &vars);
            let healthy = wait_healthy(port.parse().unwrap()).await;
            signal(&server, "TERM");
            wait_exit(&mut server).await;
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
            assert!(healthy, "{log}");
            log
        };
        let warned = warnings(&log);
        assert!(
            warned.len() == 1
                && warned[0].contains("WARN")
                && warned[0].contains(&file.display().to_string())
                && warned[0].contains("new database")
                && warned[0].contains("OPERATIONS.md"),
            "{command}: {log}"
        );
        // Set up now: the next start says nothing of it.
        let out = output(edgegate(dir.path(), &vars).arg("migrate"));
        assert!(
            warnings(&String::from_utf8_lossy(&out.stderr)).is_empty(),
            "{out:?}"
        );
    }

    // A file edgegate makes itself.
    let fresh = dir.path().join("fresh.db");
    let fresh_url = format!("sqlite://{}", fresh.display());
    let out = output(edgegate(dir.path(), &[("DATABASE_URL", fresh_url.as_str())]).arg("migrate"));
    assert!(out.status.success(), "{out:?}");
    assert!(fresh.exists());
    assert!(
        warnings(&String::from_utf8_lossy(&out.stderr)).is_empty(),
        "{out:?}"
    );
}

/// A second process starting on a new database file that another is setting up (made, 0 bytes,
/// not given its first page yet) waits for that one and does not warn of an empty file: it
/// warned ("exists but is empty ... set up as a new database") for a file that was not empty a
/// moment later. The other process is this test, which holds the migration lock, as a process
/// setting the file up now does, until it has given the file its first page.
#[tokio::test]
async fn a_new_file_another_process_is_setting_up_is_not_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let vars = [("DATABASE_URL", url.as_str())];
    std::fs::write(&file, b"").unwrap();
    let lock = std::fs::File::create(dir.path().join("edgegate.db.migrate-lock")).unwrap();
    lock.lock().unwrap();
    let mut second = edgegate(dir.path(), &vars);
    second.arg("migrate");
    let mut second = crate::process::spawn_logged(second, dir.path(), "second.log");
    let log = || std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    // It says that it waits after 2 s.
    for _ in 0..150 {
        if log().contains("waiting to set up the new database file") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        log().contains("waiting to set up the new database file"),
        "{}",
        log()
    );
    // Set up as serve sets it up: its first page, in WAL mode.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    pool.close().await;
    assert!(std::fs::metadata(&file).unwrap().len() > 0);
    drop(lock);
    let status = wait_exit(&mut second).await;
    let log = log();
    assert!(status.success(), "{log}");
    assert!(!log.contains("exists but is empty"), "{log}");
}

/// A SQLite file with a damaged page far from anything start-up reads (here, in the middle of
/// the audit log) is served; `check` runs SQLite's `PRAGMA quick_check` and fails its database
/// line naming SQLite's first complaint. It said `ok … answers; N migrations applied`.
#[tokio::test]
async fn check_fails_a_sqlite_file_with_a_damaged_page() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for row in 0..2000 {
        sqlx::query(
            "INSERT INTO audit_log (id, at, credential_source, credential_id, action, outcome, \
             detail) VALUES ($1, 0, 'system', 'system', 'test', 'ok', $2)",
        )
        .bind(format!("row-{row}"))
        .bind(format!("marker-{row}-{}", "x".repeat(400)))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // Every page in the main file, none left in the -wal.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok") && line.contains("quick_check ok"),
        "{line}"
    );

    // The page holding row 1000's cell: its header overwritten.
    let mut bytes = std::fs::read(&file).unwrap();
    let marker = b"marker-1000-";
    let at = bytes
        .windows(marker.len())
        .position(|window| window == marker)
        .expect("the row is in the file");
    let page = at - at % usize::try_from(page_size).unwrap();
    bytes[page..page + 12].fill(0xff);
    std::fs::write(&file, &bytes).unwrap();

    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("FAIL") && line.contains("quick_check") && line.contains("page"),
        "{line}"
    );
}

/// `check`'s quick_check answered with an error that says nothing of the file being damaged:
/// here a table whose CHECK constraint calls a function this SQLite lacks (an extension's, or a
/// newer SQLite's), which every other query edgegate makes leaves alone. The database line fails
/// with SQLite's words and says the file is not checked, not that it is damaged or to restore a
/// backup.
#[tokio::test]
async fn check_says_a_quick_check_error_that_is_not_damage_as_such() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for sql in [
        "CREATE TABLE added (x INTEGER CHECK (abs(x) >= 0))",
        "INSERT INTO added VALUES (1)",
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_schema SET sql = replace(sql, 'abs(', 'extension_fn(') \
         WHERE name = 'added'",
        "PRAGMA writable_schema = OFF",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = database_line(&stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        line.starts_with("FAIL")
            && line.contains("answers, but SQLite's PRAGMA quick_check failed")
            && line.contains("unknown function: extension_fn()")
            && line.contains("the file is not checked")
            && !line.contains("damaged")
            && !line.contains("restore the last good backup"),
        "{line}"
    );
}

/// A volume owned by another uid (1000, a bind mount) and open to all (mode 777), where serve
/// runs as uid 10001 and its own `migrate` made the files (10001's, mode 0600): `check` run as
/// that user passes and advises nothing. It judged the files for the directory's owner and
/// said to chown them to uid 1000, which would have stopped serve.
#[tokio::test]
async fn check_run_as_the_serve_user_judges_for_itself_in_another_users_directory() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", 1000) else {
        return;
    };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = data.join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let migrated = output(as_image_user(dir.path(), &bin, &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok") && !line.contains("chown") && !line.contains("uid 1000"),
        "{line}"
    );
    // Root's `check` judges them for their owner, uid 10001: ok too.
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(line.starts_with("ok") && !line.contains("chown"), "{line}");
    // Root's file, which only its group (2000) may read and write: root's `check` judges it for
    // the directory's owner, uid 1000, whose supplementary groups it cannot know; said, not
    // failed.
    std::os::unix::fs::chown(&file, Some(0), Some(2000)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok") && line.contains("cannot tell whether uid 1000"),
        "{line}"
    );
}

/// A database not there yet in a bind mount of another user's (uid 1000, mode 0755), which the
/// image's user (uid 10001, as serve runs in the image) may not create files in: `check` run as
/// uid 10001 fails, naming the directory; run as root, which cannot tell which user serve runs
/// as, it took the directory's owner for serve's user and said a plain "ok … not there yet",
/// while serve in the image stopped. It now says so of uid 10001 in a note, without failing
/// (serve may run as uid 1000), and says nothing where uid 10001 may create files there.
#[tokio::test]
async fn check_run_as_root_names_the_image_user_for_a_directory_of_another_users() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", 1000) else {
        return;
    };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let url = format!("sqlite://{}", data.join("edgegate.db").display());
    let vars = [("DATABASE_URL", url.as_str())];
    let shown = std::fs::canonicalize(&data).unwrap();
    // As serve in the image runs: refused, and the directory named.
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL") && line.contains(&*shown.to_string_lossy()),
        "{line}"
    );
    // As root: not failed (uid 1000 may create it), but uid 10001's refusal said.
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok")
            && line.contains("not there yet")
            && line.contains(&format!("uid {IMAGE_UID}"))
            && line.contains(&*shown.to_string_lossy()),
        "{line}"
    );
    assert!(
        !data.join("edgegate.db").exists(),
        "check created the database"
    );
    // One uid 10001 may create files in: nothing to say.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("ok") && !line.contains(&format!("uid {IMAGE_UID}")),
        "{line}"
    );
    // One uid 1000 may not create files in: failed, for uid 1000.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL")
            && line.contains("uid 1000")
            && !line.contains(&format!("uid {IMAGE_UID}")),
        "{line}"
    );
}

/// An existing database, with `check` run as root (as `fly ssh console` runs it): it judged the
/// file for its owner only, or for its directory's where root owns the file, and a file of
/// root's in a directory of root's passed, as did uid 10001's file in a directory of root's,
/// mode 0755, where serve (uid 10001) stops: it creates the -wal and -shm there. It now judges
/// the file and its directory for the image's user too, saying in a note, not failing, what
/// uid 10001 may not where the owner may, and failing where the owner may not either; and it
/// judges the directories above for searching. A directory of uid 1000's that only its group
/// 10001 may write (mode 0575) failed a database not there yet, though uid 10001 creates it.
#[tokio::test]
async fn check_run_as_root_judges_an_existing_database_for_the_image_user() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", 0) else {
        return;
    };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = data.join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let check = || {
        let out = output(edgegate(dir.path(), &vars).arg("check"));
        database_line(&String::from_utf8_lossy(&out.stdout))
    };
    let as_image_user_migrates = || {
        output(as_image_user(dir.path(), &bin, &vars).arg("migrate"))
            .status
            .success()
    };
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let shown = std::fs::canonicalize(&data).unwrap();
    let shown = shown.to_string_lossy();

    // Root's file in root's directory: serve may run as root, which is told to change nothing
    // if it does; uid 10001's refusal said.
    assert!(!as_image_user_migrates());
    let line = check();
    // Named by the phrases, not the paths alone, which the URL at the line's start holds.
    assert!(
        line.starts_with("ok")
            && line.contains(&format!(
                "uid 0 (root, this command's user) may use the database there: change nothing if \
                 serve runs as it; if serve runs as uid {IMAGE_UID} (the image's user), it cannot \
                 use the database: its directory {shown} (uid 0, mode 755) cannot be written to"
            ))
            && line.contains(&format!(
                "{shown}/edgegate.db is owned by uid 0 with mode 6"
            )),
        "root's file in root's directory: {line}"
    );

    // uid 10001's file in root's directory, mode 0755: uid 10001 may not create its -wal and
    // -shm there, and serve stops.
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    assert!(!as_image_user_migrates());
    let line = check();
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "its directory {shown} (uid 0, mode 755) cannot be written to by uid {IMAGE_UID}"
            )),
        "uid 10001's file in root's directory: {line}"
    );

    // The directory given to uid 10001 too: ok, nothing said.
    chown(&data, IMAGE_UID);
    assert!(as_image_user_migrates());
    let line = check();
    assert!(
        line.starts_with("ok") && !line.contains("cannot tell"),
        "{line}"
    );

    // A directory above it that uid 10001 may not search: failed, naming it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let line = check();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let above = std::fs::canonicalize(dir.path()).unwrap();
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "{} (uid 0, mode 700), a directory above the database's, cannot be searched",
                above.to_string_lossy()
            )),
        "a directory above of root's, mode 0700: {line}"
    );

    // Not there yet, in a directory of uid 1000's that only its group, 10001, may write: uid
    // 10001 creates it.
    for entry in std::fs::read_dir(&data).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    std::os::unix::fs::chown(&data, Some(1000), Some(IMAGE_UID)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o575)).unwrap();
    let line = check();
    assert!(
        line.starts_with("ok") && line.contains("not there yet"),
        "a directory uid 10001 may write through its group: {line}"
    );
    assert!(as_image_user_migrates());
}

/// A symbolic link planted as the migration lock by the user that owns the database (uid 10001)
/// towards a file of root's: root's `migrate` leaves that file root's. It opened the link's
/// target and gave it to the database file's owner, so any file could be given to uid 10001.
/// The target is empty with one link, as a lock root left is, so that only the link not being
/// followed (`O_NOFOLLOW`) keeps it root's.
#[tokio::test]
async fn a_migration_lock_planted_as_a_link_gives_nothing_away() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    // Root's, which may give files away (and as `image_user_can_run` tells).
    if !image_user_can_run(&binary_for_anyone(dir.path())) {
        return;
    }
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let file = data.join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let lock = data.join("edgegate.db.migrate-lock");
    let _ = std::fs::remove_file(&lock);
    let target = dir.path().join("roots-secret");
    // Empty, one link, root's: what root's migrate gives away when it opens it (a lock root
    // left), so that only the link not being followed keeps it root's.
    std::fs::write(&target, b"").unwrap();
    let owner = std::fs::metadata(&target).unwrap().uid();
    assert_eq!(owner, 0);
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    chown(&data, IMAGE_UID);
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let out = output(edgegate(dir.path(), &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let after = std::fs::metadata(&target).unwrap().uid();
    assert_eq!(
        after, owner,
        "root's migrate gave the link's target away: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is not a regular file", lock.display())),
        "{stderr}"
    );
}

/// The migration lock a `migrate` of an earlier release run as root left (root's, mode 0600,
/// empty) beside files a restore gave back to uid 10001: root's `migrate` (a restore's, a
/// console's) gives it to the database file's owner, and `serve` as uid 10001 migrates and
/// starts. It left such a lock root's (only a lock it made was given), and every later migration
/// as uid 10001 stopped on it. Not a file with another link (one planted as a hard link to a file
/// of root's), nor another user's lock, nor a file of root's with content (no lock edgegate made
/// holds any): those stay as they were, and uid 10001's `migrate` names the root-owned one.
#[tokio::test]
async fn a_migration_lock_an_older_root_migrate_left_is_given_back() {
    use std::os::unix::fs::MetadataExt as _;
    let Some((dir, bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let file = data.join("edgegate.db");
    let lock = data.join("edgegate.db.migrate-lock");
    let url = format!("sqlite://{}", file.display());
    let port = free_port().to_string();
    let vars = [("DATABASE_URL", url.as_str()), ("PORT", port.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    for entry in std::fs::read_dir(&data).unwrap() {
        chown(&entry.unwrap().path(), IMAGE_UID);
    }
    let fresh_root_lock = || {
        std::fs::remove_file(&lock).unwrap();
        std::fs::write(&lock, b"").unwrap();
        chown(&lock, 0);
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
    };

    // A second link to the lock (a file of root's elsewhere, linked in): left root's.
    fresh_root_lock();
    let other_link = dir.path().join("roots-file");
    std::fs::hard_link(&lock, &other_link).unwrap();
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(
        std::fs::metadata(&other_link).unwrap().uid(),
        0,
        "a linked file given away"
    );
    std::fs::remove_file(&other_link).unwrap();

    // Another user's lock: left that user's.
    chown(&lock, 1000);
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(
        std::fs::metadata(&lock).unwrap().uid(),
        1000,
        "uid 1000's lock taken"
    );

    // Root's, one link, with content (not a lock edgegate left, which is empty): left root's,
    // and the image user's migrate stops on it, naming it and the chown to run.
    fresh_root_lock();
    std::fs::write(&lock, b"root's").unwrap();
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    assert_eq!(
        std::fs::metadata(&lock).unwrap().uid(),
        0,
        "root's file with content given away"
    );
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is owned by uid 0", lock.display()))
            && stderr.contains(&format!("chown {IMAGE_UID}:{IMAGE_UID} ")),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&lock).unwrap(), b"root's");

    // Root's own lock, one link: given to the database file's owner, its mode kept.
    fresh_root_lock();
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    let meta = std::fs::metadata(&lock).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (IMAGE_UID, IMAGE_UID, 0o600),
        "root's lock not given back"
    );
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("migrate"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut serve = as_image_user(dir.path(), &bin, &vars);
    serve.arg("serve");
    let mut server = crate::process::spawn_logged(serve, dir.path(), "server.log");
    let healthy = wait_healthy(port.parse().unwrap()).await;
    signal(&server, "TERM");
    wait_exit(&mut server).await;
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(healthy, "serve as uid {IMAGE_UID} did not start: {log}");
}

/// A FIFO planted as the migration lock (by anyone who may write in the database's folder):
/// `migrate`, and `serve` with it, waited in `open` for a reader that never came. Now refused
/// at once, saying what is there and to remove it.
#[tokio::test]
async fn a_migration_lock_planted_as_a_fifo_is_refused_not_waited_on() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let lock = data.join("edgegate.db.migrate-lock");
    let made = Command::new("mkfifo").arg(&lock).status().unwrap();
    assert!(made.success());
    chown(&lock, IMAGE_UID);
    let url = format!("sqlite://{}", data.join("edgegate.db").display());
    let vars = [("DATABASE_URL", url.as_str())];
    // Bounded at 35 s by `as_image_user`'s `timeout` (killed, 137, where it waited in `open`).
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("migrate"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is not a regular file", lock.display()))
            && stderr.contains("remove it"),
        "{stderr}"
    );
}

/// A DATABASE_URL naming a symbolic link to a file not there yet: SQLite creates the file at the
/// link's target and its -wal and -shm beside it, and the migration lock is taken there too, and
/// the new file is private to its owner. The lock was made beside the link (another lock for
/// a second link to the same file), and the file with the umask's mode.
#[tokio::test]
async fn a_link_to_a_database_not_there_yet_is_resolved_as_sqlite_resolves_it() {
    let dir = tempfile::tempdir().unwrap();
    let links = dir.path().join("links");
    let real = dir.path().join("real");
    std::fs::create_dir(&links).unwrap();
    std::fs::create_dir(&real).unwrap();
    let link = links.join("edgegate.db");
    // A link to a link, relative, to a file not there yet.
    std::os::unix::fs::symlink("../real/middle.db", &link).unwrap();
    std::os::unix::fs::symlink("edgegate.db", real.join("middle.db")).unwrap();
    let target = real.join("edgegate.db");
    let url = format!("sqlite://{}", link.display());
    let out = output(edgegate(dir.path(), &[("DATABASE_URL", url.as_str())]).arg("migrate"));
    assert!(out.status.success(), "{out:?}");
    assert!(target.is_file(), "no database at the link's target");
    assert!(
        real.join("edgegate.db.migrate-lock").exists(),
        "no lock beside the target"
    );
    assert!(
        !links.join("edgegate.db.migrate-lock").exists(),
        "a lock beside the link"
    );
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

/// `check` (or `keys report`) run as a user that is neither root nor the files' owner, where the
/// files are another user's, maybe serve's own (uid 1000 here, mode 0600): the advice said the
/// user running it was serve's and to chown the files to it, which would stop serve. It now
/// says whose they are and to run the command as that user if serve is it.
#[tokio::test]
async fn check_run_by_another_user_does_not_advise_taking_serves_files() {
    let Some((dir, bin, data)) = folder_for_the_image_user("data", IMAGE_UID) else {
        return;
    };
    let file = data.join("edgegate.db");
    let url = format!("sqlite://{}", file.display());
    let vars = [("DATABASE_URL", url.as_str())];
    let migrated = output(edgegate(dir.path(), &vars).arg("migrate"));
    assert!(migrated.status.success(), "{migrated:?}");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        chown(&path, 1000);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = output(as_image_user(dir.path(), &bin, &vars).arg("check"));
    let line = database_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!("this command runs as uid {IMAGE_UID}"))
            && line.contains(
                "they are uid 1000's: if edgegate runs as uid 1000, run this command as that user \
                 instead and change nothing; otherwise,"
            )
            && !line.contains("fly ssh console"),
        "{line}"
    );
}
