//! The embedded backend: one SQLite file in WAL mode, created on first run.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The embedded migrations. A database that has a newer migration than this binary knows is
/// accepted, so rolling back to an older release works while migrations stay additive.
pub(super) fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator
}

/// How long a statement waits for another connection's write lock before failing.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a query waits for one of the pool's connections.
pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The readiness probe's wait for the write lock: short, so `/readyz` answers promptly.
const PROBE_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a start-up waiting for another process's migration lock tries it again.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(100);

pub(super) async fn connect(url: &str) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)
        .context("DATABASE_URL is not a usable SQLite location")?;
    let file = options.get_filename();
    // SQLite says only "(code: 14) unable to open database file" where it cannot create one.
    if !is_in_memory(file)
        && let Some(problem) = missing_directory(file)
    {
        anyhow::bail!(
            "{} is not there, and {problem}: it cannot be created (create the directory first)",
            file.display()
        );
    }
    // Held until the pool has given a new file its first page (to the end).
    let mut _setting_up = None;
    // Not for `mode=ro`, which opens an existing file or fails (`create_if_missing` below makes
    // every other mode create it).
    if !url.contains("mode=ro") && !is_in_memory(file) {
        if let Some(problem) = unwritable_directory(file) {
            anyhow::bail!("{}: {problem}", file.display());
        }
        if let Some(problem) = files_not_read_writable(file) {
            anyhow::bail!(problem);
        }
        // A file not there or with no pages yet is judged, made and given its first page (the
        // pool's switch to WAL writes it) under the migration lock: another process starting
        // beside this one may have just made it, and holds the lock until it has its first
        // page. Judged without it where the lock cannot be opened (the lock's own refusal is a
        // migration's to name).
        if !std::fs::metadata(file).is_ok_and(|meta| meta.len() > 0) {
            _setting_up = set_up_lock(file).await;
        }
        // Before the file is made: one made here is new on purpose. `check` and `keys report`
        // refuse an empty file before they get here (`commands::absent_sqlite_database`).
        // SQLite would delete the -wal on opening the file, and with it what a restore put
        // there: nothing starts on it. The -wal is read first: a process starting beside this
        // one on a new file gives the file its first page before its -wal holds anything, so
        // read in this order they are never seen as an empty file beside a -wal in use.
        if let Some((wal, size)) = discarded_wal(file)
            && is_empty_database(file)
        {
            anyhow::bail!(
                "{} exists but is empty (0 bytes), and {} holds {size} bytes, which SQLite \
                 discards (deletes) when it opens a database file with no pages: not started on \
                 them. If a restore left them so (a copy of nothing, a truncated copy), restore \
                 again, the database file and its -wal together (docs/OPERATIONS.md, Backup and \
                 restore); if this is a new deployment, delete both files",
                file.display(),
                wal.display()
            );
        }
        if is_empty_database(file) {
            tracing::warn!(
                "{} exists but is empty (0 bytes): it is set up as a new database, with no \
                 data. If a restore left it empty (a copy of nothing, a truncated copy), what the \
                 backup held is not in it: stop edgegate and restore again (docs/OPERATIONS.md, \
                 Backup and restore)",
                file.display()
            );
        }
        create_private(file);
    }
    let options = options
        .create_if_missing(true)
        // WAL lets readers run beside the single writer. FULL syncs the WAL at every commit:
        // NORMAL survives the process's crash but not the machine's, and a commit is a promise
        // made outward (a webhook answered 200, an SMS that must not be sent twice).
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        // Writers from other connections or processes wait instead of failing at once.
        .busy_timeout(BUSY_TIMEOUT);
    let pool = || {
        SqlitePoolOptions::new()
            .max_connections(8)
            // A file locked by another process shows as SQLITE_BUSY after the busy timeout; the
            // acquire timeout only bounds waiting for one of our own connections.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(|conn, _| Box::pin(leave_no_transaction_open(conn)))
            .connect_with(options.clone())
    };
    // Two processes opening a new file at once both switch it to WAL; SQLite answers one of
    // them SQLITE_BUSY at once (the busy handler is not called for that lock), so retry a little.
    let mut pause = Duration::from_millis(50);
    for _ in 0..OPEN_RETRIES {
        match pool().await {
            Err(err) if is_busy(&err) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            other => return other.context("opening the SQLite database"),
        }
    }
    pool().await.context("opening the SQLite database")
}

/// The migration lock of the database `file`, taken (waited for as a migration waits for it),
/// for setting up a file not there yet or with no pages: `None` where it cannot be opened or
/// taken, and the file is judged without it, or where the process that held it set the file up
/// meanwhile (it has pages now), and there is nothing to set up.
async fn set_up_lock(file: &Path) -> Option<std::fs::File> {
    let path = migration_lock_path(file)?;
    let (lock, made) = open_migration_lock(Path::new(&path)).ok()?;
    give_lock_to_database_owner(&lock, made, file);
    let started = std::time::Instant::now();
    let said = super::wait_for_migration_lock(take_lock(&lock), super::LockWait::SetUp)
        .await
        .ok()?;
    let set_up_meanwhile = std::fs::metadata(file).is_ok_and(|meta| meta.len() > 0);
    // After the wait was said, what this process does now: it said it waits to set the file up.
    if said {
        let waited_s = started.elapsed().as_secs();
        if set_up_meanwhile {
            tracing::info!(
                waited_s,
                "the migration lock is taken; the process that held it set the database file up"
            );
        } else {
            tracing::info!(
                waited_s,
                "the migration lock is taken; setting up the database file"
            );
        }
    }
    (!set_up_meanwhile).then_some(lock)
}

/// Takes the lock on `file`, trying again every [`MIGRATION_LOCK_POLL`]: polled, not waited
/// for on a blocking thread, so that a start-up stopped while waiting ends at once, with no
/// thread left behind holding the process open.
async fn take_lock(file: &std::fs::File) -> anyhow::Result<()> {
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                tokio::time::sleep(MIGRATION_LOCK_POLL).await;
            }
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(err).context("taking the SQLite migration lock");
            }
        }
    }
}

/// Whether a connection given back to the pool may be used again: not when sqlx still counts
/// it inside a transaction. A COMMIT that fails on a full disk or an I/O error ends the
/// transaction in SQLite (its rollback), while sqlx 0.9.0 counted it open, and its ROLLBACK on
/// drop then failed (0.9.1 reads SQLite's autocommit state and sets its count back itself,
/// transact-rs/sqlx#4473; this stays for any other way a connection comes back counted inside
/// one, a ROLLBACK that fails with the transaction still open); used again, the connection would take each later transaction as a savepoint of one
/// that is no longer there (the first savepoint rolled back to would open it for good, with the
/// write lock), and their commits would reach no file. Closed instead (SQLite ends whatever it
/// still holds), and the pool opens another. A transaction dropped on an error queues its
/// rollback without waiting for it: the ping waits for that first, so only a connection whose
/// rollback failed is closed. Nothing more than a load of the count on every other release.
async fn leave_no_transaction_open(conn: &mut sqlx::SqliteConnection) -> sqlx::Result<bool> {
    use sqlx::Connection as _;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    conn.ping().await?;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    tracing::warn!(
        "a database connection is still inside a transaction that could not be ended (a COMMIT \
         or ROLLBACK failed: a full disk, an I/O error); closing it"
    );
    Ok(false)
}

/// Creates a database file that is not there yet readable by its owner only: it holds SMS
/// bodies, phone numbers and customers' emails, and SQLite would create it with the umask's
/// mode (usually world-readable). SQLite gives its -wal and -shm files the database file's
/// mode. An existing file keeps the mode its operator chose; a file that cannot be created
/// here (no such directory, no permission) is left for SQLite to open and report.
fn create_private(file: &Path) {
    use std::os::unix::fs::OpenOptionsExt as _;
    // At a link's target, which `create_new` does not follow.
    let file = &resolved(file);
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file);
}

/// What keeps SQLite from creating `file`: its directory is missing or is not a directory.
/// `None` when the directory is there.
pub(crate) fn missing_directory(file: &Path) -> Option<String> {
    let directory = file.parent()?;
    // A bare file name lives in the working directory, which exists.
    if directory.as_os_str().is_empty() || directory.is_dir() {
        return None;
    }
    let shown = directory.display();
    Some(if directory.exists() {
        format!("{shown} is not a directory")
    } else {
        format!("its directory {shown} does not exist")
    })
}

/// What keeps edgegate from writing in `file`'s directory, which exists: SQLite creates the
/// database there and, in WAL mode, its -wal and -shm files beside it, and says only "(code: 14)
/// unable to open database file" where it cannot (a volume owned by another user, a read-only
/// root filesystem). Found by creating and removing a file there. `None` when it can.
pub(crate) fn unwritable_directory(file: &Path) -> Option<String> {
    let file = &resolved(file);
    let directory = match file.parent() {
        Some(directory) if !directory.as_os_str().is_empty() => directory,
        _ => Path::new("."),
    };
    let name = file.file_name()?.to_string_lossy();
    // The process id alone would be the same at every start as PID 1 in a container, where a
    // probe left by a killed process would pass for writable.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let probe = directory.join(format!(
        ".{name}.write-probe-{}-{nanos}",
        std::process::id()
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(err) if err.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            Some(format!(
                "its directory {} cannot be written to ({err}): edgegate creates the database \
                 and its -wal and -shm files there, and the filesystem holding it is mounted \
                 read-only; mount it read-write (a volume or root filesystem mounted read-only)",
                shell_quoted(directory)
            ))
        }
        Err(err) => Some(format!(
            "its directory {} cannot be written to ({err}): edgegate creates the database and \
             its -wal and -shm files there; make it writable by the user edgegate runs as (uid \
             10001 in the image)",
            shell_quoted(directory)
        )),
    }
}

/// Whether the database `file` is there and empty (0 bytes). SQLite takes such a file for a new
/// database, as it takes no file at all: a restore that copied nothing (or a truncated copy)
/// starts as a new database with no data. Whatever a `-wal` beside it holds: SQLite deletes the
/// `-wal` of a database file with no pages when it opens it ([`discarded_wal`]).
pub(crate) fn is_empty_database(file: &Path) -> bool {
    std::fs::metadata(file).is_ok_and(|meta| meta.is_file() && meta.len() == 0)
}

/// The `-wal` beside the empty database `file` and its size, when it holds anything: SQLite
/// deletes it when it opens the file (it holds no pages, so no WAL can belong to it), and with it
/// whatever a restore or a copy put there.
pub(crate) fn discarded_wal(file: &Path) -> Option<(std::path::PathBuf, u64)> {
    let [_, wal, _] = database_files(file);
    let size = std::fs::metadata(&wal).ok()?.len();
    (size > 0).then_some((wal, size))
}

/// What is said of the empty database `file` ([`is_empty_database`]) after "exists but is empty
/// (0 bytes), no database": what serve and migrate do with it, and what to do, which differs
/// when a `-wal` SQLite would discard lies beside it (they refuse to start on it).
pub(crate) fn empty_database_advice(file: &Path) -> String {
    match discarded_wal(file) {
        Some((wal, size)) => format!(
            "; {} holds {size} bytes, which SQLite discards (deletes) when it opens a database \
             file with no pages: serve and migrate refuse to start on them; restore again, the \
             database file and its -wal together (docs/OPERATIONS.md, Backup and restore); if \
             this is a new deployment, delete both files",
            wal.display()
        ),
        None => ": serve and migrate would set it up as a new one with no data; if a restore left \
                 it empty (a copy of nothing, a truncated copy), restore again before starting \
                 (docs/OPERATIONS.md, Backup and restore); if this is a new deployment, delete the \
                 empty file (serve creates the database)"
            .to_owned(),
    }
}

/// How many symbolic links [`resolved`] follows, as SQLite's `SQLITE_MAX_SYMLINK`.
const MAX_SYMLINKS: usize = 100;

/// The database `file` with every symbolic link on its way resolved, as SQLite resolves it: its
/// directory canonicalized, and a link in its last component followed (relative to the
/// directory it is in) to a file that need not be there yet, which SQLite creates at the target.
/// SQLite makes the -wal and -shm beside the target, in its directory. `file` as it is where its
/// directory is not there, or past [`MAX_SYMLINKS`] links (SQLite fails to open it).
fn resolved(file: &Path) -> std::path::PathBuf {
    let mut path = file.to_owned();
    for _ in 0..MAX_SYMLINKS {
        let directory = match path.parent() {
            Some(directory) if !directory.as_os_str().is_empty() => directory,
            _ => Path::new("."),
        };
        let (Some(name), Ok(directory)) = (path.file_name(), std::fs::canonicalize(directory))
        else {
            return path;
        };
        let joined = directory.join(name);
        match std::fs::read_link(&joined) {
            Ok(target) => path = directory.join(target),
            Err(_) => return joined,
        }
    }
    path
}

/// The files SQLite reads and writes for the database `file` (beside its target, for a
/// symbolic link): the database, and its `-wal` and
/// `-shm` beside it. Not the migration lock ([`migration_lock_path`]), which only a migration
/// opens (for writing), and which [`migrate`] names when it cannot.
fn database_files(file: &Path) -> [std::path::PathBuf; 3] {
    let file = &resolved(file);
    let beside = |suffix: &str| {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        std::path::PathBuf::from(path)
    };
    [file.to_owned(), beside("-wal"), beside("-shm")]
}

/// The files of the database `file` ([`database_files`]) that are there and that SQLite opens.
/// Not a `-wal` beside a database with no pages (no file, or 0 bytes): SQLite deletes that
/// `-wal` unopened, which needs only the directory's write permission (and, in a directory
/// with the sticky bit, such as /tmp, the file's ownership: there it is kept).
fn files_sqlite_opens(file: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let file = &resolved(file);
    let has_pages = std::fs::metadata(file).is_ok_and(|meta| meta.len() > 0);
    let sticky = || {
        let directory = match file.parent() {
            Some(directory) if !directory.as_os_str().is_empty() => directory,
            _ => Path::new("."),
        };
        std::fs::metadata(directory).is_ok_and(|meta| meta.permissions().mode() & 0o1000 != 0)
    };
    let [database, wal, shm] = database_files(file);
    let wal = (has_pages || sticky()).then_some(wal);
    [Some(database), wal, Some(shm)]
        .into_iter()
        .flatten()
        .filter(|path| path.exists())
        .collect()
}

/// `path`, its owner and mode when it can be read, and why it `cannot be opened for {opening}`.
fn refused_file(path: &Path, opening: &str, refusal: &dyn std::fmt::Display) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(path).map_or_else(
        |_| String::new(),
        |meta| {
            format!(
                " is owned by uid {} with mode {:o}, and",
                meta.uid(),
                meta.mode() & 0o7777
            )
        },
    );
    format!(
        "{}{owner} cannot be opened for {opening} ({refusal})",
        path.display()
    )
}

/// The user `serve` runs as for the database `file`, as far as this process can tell.
struct Server {
    uid: u32,
    gid: u32,
    /// Why `check` takes this user for serve's (the owner of the database file, or of its
    /// directory), or [`THE_IMAGE_USER`]: `None` for this process's own user.
    whose: Option<String>,
}

impl Server {
    /// This process's user: the one `serve` and `migrate` judge files for, and name in their
    /// advice.
    fn this_process() -> Self {
        Self {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            whose: None,
        }
    }
}

/// Who `check` judges the database `file` for. Run as root (`fly ssh console -C "edgegate
/// check"`), which may open any file: the database file's owner when that is not root, else
/// its directory's owner when that is not root (the image's /data is uid 10001's), else root.
/// Run as any other user, that user: the serve user itself, most likely, in a directory that
/// may be another's (a bind mount open to all), where the directory's owner was taken for
/// serve's user and `check` advised a chown that stopped serve.
fn judged_server(file: &Path) -> Server {
    use std::os::unix::fs::MetadataExt as _;
    if !rustix::process::geteuid().is_root() {
        return Server::this_process();
    }
    let file = resolved(file);
    let directory = match file.parent() {
        Some(directory) if !directory.as_os_str().is_empty() => directory,
        _ => Path::new("."),
    };
    for (path, what) in [
        (file.as_path(), "the owner of"),
        (directory, "the owner of"),
    ] {
        if let Ok(meta) = std::fs::metadata(path)
            && meta.uid() != 0
        {
            return Server {
                uid: meta.uid(),
                gid: meta.gid(),
                whose: Some(format!("{what} {}", shell_quoted(path))),
            };
        }
    }
    Server::this_process()
}

/// What the owner, group and mode bits of the file `meta` describes say of `server` reading
/// and writing it.
enum ModeSays {
    Allowed,
    /// Why not.
    Refused(String),
    /// Why they cannot say: the file has an ACL, or only its group may read and write it and
    /// `server`'s supplementary groups are not known here.
    CannotTell(String),
}

/// Whether `path` has an access ACL, which its mode does not show.
fn has_acl(path: &Path) -> bool {
    rustix::fs::getxattr(path, "system.posix_acl_access", &mut [0u8; 0][..]).is_ok()
}

/// A file's owner, group and mode, as its metadata gives them.
struct Owner {
    uid: u32,
    gid: u32,
    mode: u32,
}

/// The permission bits [`bits_say`] looks for, and how its answers name them.
struct Wanted {
    /// In the "others" position: `0o6` for reading and writing.
    bits: u32,
    /// As "only its group (gid …) may {verb} it".
    verb: &'static str,
    /// As "permissions in its mode do not give {noun}".
    noun: &'static str,
}

/// A database file's: reading and writing.
const READ_WRITE: Wanted = Wanted {
    bits: 0o6,
    verb: "read and write",
    noun: "reading and writing",
};

/// A directory SQLite creates the database and its -wal and -shm files in: writing and
/// searching.
const CREATE_IN: Wanted = Wanted {
    bits: 0o3,
    verb: "create files in",
    noun: "writing and searching",
};

/// What `owner`'s owner, group and mode bits say of `server` having the permissions `wanted`
/// names; [`ModeSays::CannotTell`] where only its group has them (`server`'s supplementary
/// groups are not known here).
fn bits_say(owner: &Owner, server: &Server, wanted: &Wanted) -> ModeSays {
    let has = |bits: u32| bits & wanted.bits == wanted.bits;
    let (bits, whose) = if owner.uid == server.uid {
        (owner.mode >> 6, "its owner's")
    } else if owner.gid == server.gid {
        (owner.mode >> 3, "its group's")
    } else if has(owner.mode >> 3) && !has(owner.mode) {
        return ModeSays::CannotTell(format!(
            "only its group (gid {}) may {} it, and uid {}'s supplementary groups are not known \
             here",
            owner.gid, wanted.verb, server.uid
        ));
    } else {
        (owner.mode, "others'")
    };
    if has(bits) {
        ModeSays::Allowed
    } else {
        ModeSays::Refused(format!(
            "uid {} may not: {whose} permissions in its mode do not give {}",
            server.uid, wanted.noun
        ))
    }
}

/// A directory's permissions to search it: the ones above the database's.
const SEARCH: Wanted = Wanted {
    bits: 0o1,
    verb: "search",
    noun: "searching",
};

/// The image's user (`USER 10001:10001` in the Dockerfile): the user `check` run as root judges
/// the database for beside the one it takes for serve's, since nothing it finds tells it which
/// user serve runs as.
const IMAGE_USER: u32 = 10_001;

/// How `check` names the image's user ([`Server::whose`]).
const THE_IMAGE_USER: &str = "the image's user";

/// How `check`'s answers name `server`: the image's user, or the user taken for serve's and why.
fn described(server: &Server) -> String {
    match server.whose.as_deref() {
        Some(THE_IMAGE_USER) => THE_IMAGE_USER.to_owned(),
        Some(whose) => format!("{whose}, taken for the user serve runs as"),
        None if server.uid == 0 => "root, this command's user".to_owned(),
        None => "this command's user".to_owned(),
    }
}

/// A file or directory `check` judges, as its metadata gave it.
struct Entry {
    path: std::path::PathBuf,
    owner: Owner,
    /// Whether it has an access ACL, which its mode does not show.
    acl: bool,
}

impl Entry {
    /// `path`'s, where its metadata can be read.
    fn read(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            path: path.to_owned(),
            owner: Owner {
                uid: meta.uid(),
                gid: meta.gid(),
                mode: meta.mode(),
            },
            acl: has_acl(path),
        })
    }

    /// Whether its owner, group and mode give `server` the permissions `wanted` names.
    fn says(&self, server: &Server, wanted: &Wanted) -> ModeSays {
        if self.acl {
            return ModeSays::CannotTell("it has an ACL, which its mode does not show".to_owned());
        }
        bits_say(&self.owner, server, wanted)
    }

    /// As answers name it: its path for a shell, its owner and mode.
    fn shown(&self) -> String {
        format!(
            "{} (uid {}, mode {:o})",
            shell_quoted(&self.path),
            self.owner.uid,
            self.owner.mode & 0o7777
        )
    }
}

/// What `check` run as root finds of the database: the directories serve's user goes through
/// to it, the one it creates files in, and the files SQLite opens.
struct Found {
    /// The directories above the database's, from the root down, which serve's user searches.
    above: Vec<Entry>,
    /// The database's directory, where SQLite creates the database, its -wal and -shm, and a
    /// migration its lock.
    directory: Entry,
    /// The files SQLite opens that are there ([`files_sqlite_opens`]).
    files: Vec<Entry>,
    /// The database file's mode, where it is there, and its -wal and -shm not there: SQLite
    /// creates them with that mode, owned by the user that creates them (given to the
    /// database file's owner when that is root).
    created: Option<(u32, Vec<std::path::PathBuf>)>,
}

impl Found {
    /// What is there of the database `file` (beside its target, for a symbolic link); `None`
    /// where its directory is not there (said by [`missing_directory`]).
    fn of(file: &Path) -> Option<Self> {
        let file = resolved(file);
        let directory = match file.parent() {
            Some(directory) if !directory.as_os_str().is_empty() => directory,
            _ => Path::new("."),
        };
        let directory = std::fs::canonicalize(directory).ok()?;
        let mut above: Vec<Entry> = directory
            .ancestors()
            .skip(1)
            .filter_map(Entry::read)
            .collect();
        above.reverse();
        let [database, wal, shm] = database_files(&file);
        let created = std::fs::metadata(&database).ok().map(|meta| {
            use std::os::unix::fs::MetadataExt as _;
            let missing = [wal, shm]
                .into_iter()
                .filter(|path| !path.exists())
                .collect();
            (meta.mode(), missing)
        });
        Some(Self {
            above,
            directory: Entry::read(&directory)?,
            files: files_sqlite_opens(&file)
                .iter()
                .filter_map(|path| Entry::read(path))
                .collect(),
            created,
        })
    }
}

/// What `found` says of `server` (not root) using the database: what refuses it (a directory
/// above it may not search, its directory it may not create files in, the files it may not
/// read and write, a -wal or -shm SQLite would create for it with the database file's mode,
/// which it could not open again), or what cannot be told.
fn found_says(found: &Found, server: &Server) -> ServerAccess {
    let uid = server.uid;
    let who = described(server);
    let mut unsure = Vec::new();
    let mut problems = Vec::new();
    for directory in &found.above {
        match directory.says(server, &SEARCH) {
            ModeSays::Allowed => {}
            ModeSays::Refused(why) => problems.push(format!(
                "{}, a directory above the database's, cannot be searched by uid {uid} ({who}): \
                 {why}; make it searchable by uid {uid}",
                directory.shown()
            )),
            ModeSays::CannotTell(why) => {
                unsure.push(format!("search {} ({why})", shell_quoted(&directory.path)))
            }
        }
    }
    match found.directory.says(server, &CREATE_IN) {
        ModeSays::Allowed => {}
        ModeSays::Refused(why) => problems.push(format!(
            "its directory {} cannot be written to by uid {uid} ({who}): {why}; edgegate creates \
             the database and its -wal and -shm files there; make it writable by uid {uid}",
            found.directory.shown()
        )),
        ModeSays::CannotTell(why) => unsure.push(format!(
            "create the database in its directory {} ({why})",
            shell_quoted(&found.directory.path)
        )),
    }
    let mut refused = Vec::new();
    for file in &found.files {
        match file.says(server, &READ_WRITE) {
            ModeSays::Allowed => {}
            ModeSays::Refused(why) => refused.push(format!(
                "{} is owned by uid {} with mode {:o}, and cannot be opened for reading and \
                 writing ({why})",
                file.path.display(),
                file.owner.uid,
                file.owner.mode & 0o7777
            )),
            ModeSays::CannotTell(why) => {
                unsure.push(format!("read and write {} ({why})", file.path.display()));
            }
        }
    }
    // Not said again of a database file already refused for its mode.
    if let Some((mode, missing)) = &found.created
        && refused.is_empty()
    {
        let theirs = Owner {
            uid,
            gid: server.gid,
            mode: *mode,
        };
        if let ModeSays::Refused(why) = bits_say(&theirs, server, &READ_WRITE) {
            refused.extend(missing.iter().map(|path| {
                format!(
                    "{} is not there, and SQLite creates it with the database file's mode {:o}, \
                     owned by uid {uid}, which then cannot open it again for reading and \
                     writing ({why})",
                    path.display(),
                    mode & 0o7777
                )
            }));
        }
    }
    if !refused.is_empty() {
        let paths: Vec<std::path::PathBuf> =
            found.files.iter().map(|file| file.path.clone()).collect();
        problems.push(format!(
            "{}: {}",
            refused.join("; "),
            give_back(
                server,
                "must read and write the database and the files beside it",
                &paths
            )
        ));
    }
    if !problems.is_empty() {
        return ServerAccess::Refused(problems.join("; "));
    }
    if unsure.is_empty() {
        return ServerAccess::Allowed;
    }
    ServerAccess::CannotTell(format!(
        "cannot tell whether uid {uid} ({who}) may {}; not judged here",
        unsure.join(", ")
    ))
}

/// `check`'s verdict, run as root, on the database `found` for `taken`, the user
/// [`judged_server`] took for serve's (the database file's owner, or its directory's, or root
/// where both are root's), and for the image's user (uid 10001), as serve runs in the image.
/// Which of them serve runs as is not known here: failed only where neither may use the
/// database (named for `taken`), and said in a note, not failed, where only one may (serve may
/// run as root, or as the owner, `--user 1000`; or in the image, where the owner is another
/// user whose permissions the image's user has through its group), each refusal and its chown
/// on the condition that serve runs as that user, and the one who may, root too, told to
/// change nothing if serve runs as it (it needs no chown, and one would stop it). Judged for
/// `taken` alone where that is the image's user with the image's group (uid 10001 with the
/// database file's group, after a `chown 10001` of uid 1000's file, may write a directory of
/// group 1000's that the image's user, without that group, may not).
fn found_verdict(found: &Found, taken: &Server) -> ServerAccess {
    let image_user = Server {
        uid: IMAGE_USER,
        gid: IMAGE_USER,
        whose: Some(THE_IMAGE_USER.to_owned()),
    };
    // Root may use any file.
    let taken_says = match taken.whose {
        Some(_) => found_says(found, taken),
        None => ServerAccess::Allowed,
    };
    // The image's user judged with another group (the database file's, after a chown 10001)
    // is not the image's: judged for both.
    if taken.whose.is_some() && taken.uid == IMAGE_USER && taken.gid == IMAGE_USER {
        return taken_says;
    }
    let image_says = found_says(found, &image_user);
    if let (ServerAccess::Refused(problem), ServerAccess::Refused(_)) = (&taken_says, &image_says) {
        return ServerAccess::Refused(problem.clone());
    }
    // What each says: `Some(true)` may use it, `Some(false)` may not, `None` cannot tell.
    let mut parts = Vec::new();
    for (server, says) in [(taken, taken_says), (&image_user, image_says)] {
        let who = if taken.uid == IMAGE_USER {
            format!(
                "uid {} gid {} ({})",
                server.uid,
                server.gid,
                described(server)
            )
        } else {
            format!("uid {} ({})", server.uid, described(server))
        };
        parts.push(match says {
            // Root too, when taken for serve's: it may, and a chown would stop it.
            ServerAccess::Allowed => (
                Some(true),
                format!("{who} may use the database there: change nothing if serve runs as it"),
            ),
            // On a condition: the other may be serve's user, which its chown would stop.
            ServerAccess::Refused(problem) => (
                Some(false),
                format!("if serve runs as {who}, it cannot use the database: {problem}"),
            ),
            ServerAccess::CannotTell(note) => (None, note),
        });
    }
    if parts.iter().all(|(may, _)| *may == Some(true)) {
        return ServerAccess::Allowed;
    }
    // "Not every user" only where one is refused, not where it cannot be told (an ACL, a group).
    let which = if parts.iter().any(|(may, _)| *may == Some(false)) {
        "and not every user it may run as may use the database"
    } else {
        "nor whether every user it may run as may use the database"
    };
    ServerAccess::CannotTell(format!(
        "cannot tell which user serve runs as, {which}: {}; run check as the user serve runs as \
         to judge it for that user (fly ssh console --user edgegate runs it as the image's)",
        parts
            .into_iter()
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// What `check` makes of the user `serve` runs as reading and writing the database's files and
/// creating files in its directory.
pub(crate) enum ServerAccess {
    /// They may be read and written.
    Allowed,
    /// What keeps serve from them, and the commands that give them back.
    Refused(String),
    /// Which files `check` could not judge, and why: said, not failed.
    CannotTell(String),
}

/// What keeps edgegate from reading and writing the database `file` or the files beside it
/// that SQLite opens ([`files_sqlite_opens`]), each named with its owner, its mode and the system's
/// answer, and the commands that give them to the user `serve` runs as ([`server`]); `None`
/// when it can. A restore run as root leaves them root's: SQLite said only "(code: 14) unable
/// to open database file" of a file it could not read, and opened one it could read but not
/// write read-only, every write failing afterwards ("attempt to write a readonly database"),
/// the `-wal` and `-shm` alike. Asked of the system (`access`, with the effective user's
/// rights), not by opening them: closing a descriptor on a file lets go of every POSIX lock
/// this process holds on it, SQLite's among them.
pub(crate) fn files_not_read_writable(file: &Path) -> Option<String> {
    if is_in_memory(file) {
        return None;
    }
    refusals(file, &Server::this_process(), access_refusal)
}

/// Why `access` refuses this process reading and writing `path`, if it does.
fn access_refusal(path: &Path) -> Option<Refusal> {
    use rustix::fs::{Access, AtFlags, CWD, accessat};
    {
        let refusal = accessat(
            CWD,
            path,
            Access::READ_OK | Access::WRITE_OK,
            AtFlags::EACCESS,
        )
        .err()
        .filter(|errno| is_refusal(*errno))?;
        Some(Refusal {
            why: std::io::Error::from(refusal).to_string(),
            read_only: refusal == rustix::io::Errno::ROFS,
        })
    }
}

/// Whether `access` answering `errno` says the file may not be read and written: EACCES (its
/// owner and mode) or EROFS (a read-only filesystem). Any other answer is left for SQLite to
/// judge when it opens the file: with the effective user's rights `access` is `faccessat2`,
/// which rustix falls back from only on ENOSYS, and which a container runtime's seccomp filter
/// may answer EPERM (older Docker releases did, for every file), so EPERM (which also means an
/// immutable file) refuses nothing here.
fn is_refusal(errno: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    errno == Errno::ACCESS || errno == Errno::ROFS
}

/// As [`files_not_read_writable`], for the user `serve` runs as, for `check`: run as root
/// (`fly ssh console -C "edgegate check"`), which may open any file and create files anywhere,
/// it said ok of root's files, mode 0600, that `serve` (uid 10001) then could not open, and of
/// a directory of root's that serve could not create the database, or its -wal and -shm, in.
/// Run as root, judged from the owners and modes of the files, the database's directory and
/// the directories above it, for [`judged_server`]'s user and the image's (see
/// [`found_verdict`]), and not failed where those cannot decide it (an ACL, a group of which
/// that user may be a supplementary member). Run as another user, the files judged for it (its
/// `Store::connect` judges the directory).
pub(crate) fn not_usable_by_server(file: &Path) -> ServerAccess {
    // A database in memory has no file nor directory to judge.
    if is_in_memory(file) {
        return ServerAccess::Allowed;
    }
    if !rustix::process::geteuid().is_root() {
        return files_not_read_writable(file).map_or(ServerAccess::Allowed, ServerAccess::Refused);
    }
    if let Some(problem) = not_a_file(&resolved(file)) {
        return ServerAccess::Refused(problem);
    }
    match Found::of(file) {
        // On a filesystem mounted read-only no chown or chmod helps: root's own opening of the
        // database (or its probe of the directory) says so.
        Some(found) if is_read_only(&found.directory.path) => ServerAccess::Allowed,
        Some(found) => found_verdict(&found, &judged_server(file)),
        None => ServerAccess::Allowed,
    }
}

/// Whether the filesystem holding `path` is mounted read-only.
fn is_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|stat| stat.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// What is said of a database `file` (resolved) that is a directory: SQLite said only "unable
/// to open database file", and the advice was to chmod it.
fn not_a_file(resolved: &Path) -> Option<String> {
    resolved.is_dir().then(|| {
        format!(
            "{} is a directory, not a SQLite database file: DATABASE_URL must name a file (such \
             as sqlite://{}/edgegate.db), or move the directory away",
            shell_quoted(resolved),
            resolved.display()
        )
    })
}

/// The files of the database `file` that `refusal` finds something against, with the advice
/// that gives them back.
fn refusals(
    file: &Path,
    server: &Server,
    refusal: impl Fn(&Path) -> Option<Refusal>,
) -> Option<String> {
    if let Some(problem) = not_a_file(&resolved(file)) {
        return Some(problem);
    }
    let present = files_sqlite_opens(file);
    let mut read_only = false;
    let refused: Vec<String> = present
        .iter()
        .filter_map(|path| {
            let refusal = refusal(path)?;
            read_only |= refusal.read_only;
            Some(refused_file(path, "reading and writing", &refusal.why))
        })
        .collect();
    if refused.is_empty() {
        return None;
    }
    let advice = if read_only {
        "the filesystem holding them is mounted read-only, and edgegate writes the database and \
         the files beside it: mount it read-write (a volume or root filesystem mounted read-only)"
            .to_owned()
    } else {
        give_back(
            server,
            "must read and write the database and the files beside it",
            &present,
        )
    };
    Some(format!("{}: {advice}", refused.join("; ")))
}

/// Why a file of the database may not be opened for reading and writing.
struct Refusal {
    why: String,
    /// On a filesystem mounted read-only: no chown or chmod helps.
    read_only: bool,
}

/// `path` absolute (the image's default `sqlite://edgegate.db` is relative to /data, and advice
/// run from another directory would miss it) and quoted for a POSIX shell where it holds
/// anything but letters, digits and `_./+,:@%=-`.
fn shell_quoted(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let text = absolute.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./+,:@%=-".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// What to run to give `paths` (the database's) back to `server`, the user that `needs` them:
/// this process's for serve and migrate, [`judged_server`]'s for `check`.
fn give_back(server: &Server, needs: &str, paths: &[std::path::PathBuf]) -> String {
    let uid = server.uid;
    let listed = paths
        .iter()
        .map(|path| shell_quoted(path))
        .collect::<Vec<_>>()
        .join(" ");
    // Files of one user other than root and this one: maybe serve's own, with this command run
    // by someone else, who must not take them from it.
    let owners: std::collections::BTreeSet<u32> = paths
        .iter()
        .filter_map(|path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(path).ok().map(|meta| meta.uid())
        })
        .collect();
    let other_owner = match owners.iter().collect::<Vec<_>>()[..] {
        [&owner] if owner != 0 && owner != uid && server.whose.is_none() => Some(owner),
        _ => None,
    };
    let (who, other) = match (&server.whose, other_owner) {
        (Some(whose), _) => (
            format!(
                "serve runs as uid {uid}, {whose} (this command runs as uid {})",
                rustix::process::geteuid().as_raw()
            ),
            String::new(),
        ),
        (None, Some(owner)) => (
            format!("this command runs as uid {uid}"),
            format!(
                "they are uid {owner}'s: if edgegate runs as uid {owner}, run this command as \
                 that user instead and change nothing{}; otherwise, ",
                if owner == IMAGE_USER {
                    " (fly ssh console --user edgegate)"
                } else {
                    ""
                }
            ),
        ),
        (None, None) => (format!("edgegate runs as uid {uid}"), String::new()),
    };
    // The image's uid with its group, whoever the advice is for (the image's user, the owner
    // of /data taken for serve's, serve itself): after a chown of its uid alone the file's
    // group is another's (root's, after a restore), and check run as root judges the file's
    // owner with that group, not as the image's user.
    let chown = if uid == IMAGE_USER {
        format!("{IMAGE_USER}:{IMAGE_USER}")
    } else {
        uid.to_string()
    };
    format!(
        "{who} and {needs}; {other}make them readable and writable by the user edgegate runs as \
         (uid {IMAGE_USER} in the image; a restore run as root leaves them root's): chown {chown} \
         {listed}; chmod 600 {listed}"
    )
}

/// `sqlite::memory:` (and a URL with no file) names no file on disk; sqlx renames such a
/// database `file:sqlx-in-memory-N`.
pub(crate) fn is_in_memory(file: &Path) -> bool {
    let name = file.to_string_lossy();
    name.is_empty() || name.contains(":memory:") || name.starts_with("file:sqlx-in-memory-")
}

/// Attempts at opening a file that another process is switching to WAL, before the last one.
const OPEN_RETRIES: usize = 5;

/// Whether `err` is SQLite saying the file is damaged: SQLITE_CORRUPT (11) with any extended
/// code, or SQLITE_NOTADB (26). Not a busy database, a timeout or an I/O error, which say
/// nothing of what the file holds.
pub(crate) fn is_damage(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() else {
            return false;
        };
        match db.code().and_then(|code| code.parse::<i32>().ok()) {
            Some(code) => matches!(code & 0xff, 11 | 26),
            // Without a code, SQLite's own words for the two.
            None => {
                let message = db.message();
                message.contains("database disk image is malformed")
                    || message.contains("file is not a database")
            }
        }
    })
}

fn is_busy(err: &sqlx::Error) -> bool {
    // The primary result code SQLITE_BUSY (5), whatever its extended code.
    let code = match err {
        sqlx::Error::Database(db) => db.code().and_then(|code| code.parse::<i32>().ok()),
        _ => None,
    };
    code.is_some_and(|code| code & 0xff == 5)
}

/// Applies the migrations, one process at a time; returns the versions applied before, read
/// under the lock. SQLite has no advisory lock, so sqlx's
/// migrator does not serialize two instances starting together on one file; an exclusive lock
/// on a file next to the database does.
pub(super) async fn migrate(pool: &SqlitePool) -> anyhow::Result<Vec<i64>> {
    let _guard = if let Some(lock_path) = migration_lock_path(pool.connect_options().get_filename())
    {
        let options = pool.connect_options();
        let database = options.get_filename();
        let file = match open_migration_lock(Path::new(&lock_path)) {
            Ok((file, made)) => {
                give_lock_to_database_owner(&file, made, database);
                file
            }
            // A lock another user's `migrate` left (root's, mode 0644).
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                let path = std::path::PathBuf::from(&lock_path);
                anyhow::bail!(
                    "{}: {}",
                    refused_file(&path, "writing", &err),
                    give_back(
                        &Server::this_process(),
                        "takes this lock to migrate",
                        std::slice::from_ref(&path)
                    )
                );
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "opening the SQLite migration lock file {}",
                        Path::new(&lock_path).display()
                    )
                });
            }
        };
        super::wait_for_migration_lock(take_lock(&file), super::LockWait::Migration).await?;
        Some(file)
    } else {
        None
    };
    let before =
        super::applied_before(sqlx::query_scalar(super::APPLIED_SQL).fetch_all(pool).await)?;
    migrator().run(pool).await?;
    Ok(before)
}

/// Opens the migration lock at `path` for writing, and whether this call made it: never through
/// a symbolic link (one planted there would have had root's `migrate` open, and give away, the
/// file it names), and made only where no file was (`O_EXCL`). Anything but a regular file is
/// refused: a FIFO with a reader or a device node is opened (not blocking, never as the
/// controlling terminal) and refused once `fstat` says what it is.
fn open_migration_lock(path: &Path) -> std::io::Result<(std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let nofollow = rustix::fs::OFlags::NOFOLLOW.bits().cast_signed();
    let nonblock = rustix::fs::OFlags::NONBLOCK.bits().cast_signed();
    // A terminal's device planted there is opened before it is refused: never made the
    // process's controlling terminal (root's `migrate` with none, say, in a container).
    let noctty = rustix::fs::OFlags::NOCTTY.bits().cast_signed();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let made = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nofollow | noctty)
            .open(path);
        match made {
            Ok(file) => return Ok((file, true)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
        // Not blocking: a FIFO planted there would hold the open until a reader came. Not a
        // regular file (a FIFO with a reader, a device): opened, then refused, written nothing.
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nofollow | nonblock | noctty)
            .open(path)
        {
            Ok(file) if file.metadata()?.is_file() => return Ok((file, false)),
            Ok(_) => return Err(not_a_lock_file(path)),
            // A FIFO with no reader (ENXIO), a symbolic link (ELOOP): said as what they are.
            Err(_)
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|meta| !meta.file_type().is_file()) =>
            {
                return Err(not_a_lock_file(path));
            }
            // Removed between the two: made again, a few times at most.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && attempts < 3 => {}
            Err(err) => return Err(err),
        }
    }
}

/// The migration lock's path names something other than a regular file (a symbolic link, a
/// FIFO, a device), which edgegate does not open or write through.
fn not_a_lock_file(path: &Path) -> std::io::Error {
    std::io::Error::other(format!(
        "{} is not a regular file (a symbolic link, a FIFO, a device): remove it, and edgegate \
         makes the migration lock again",
        shell_quoted(path)
    ))
}

/// Gives the migration lock `lock` to the owner of the `database` file, as SQLite gives its
/// -wal and -shm files, when this is root's `migrate` (a restore's, a console's) and the lock
/// is one it has just `made`, or one root left: a `migrate` run as root left it root's, mode
/// 0644 (0600 under another umask), which stopped every later migration run as the image's user,
/// and an earlier release's left it so whatever this one does. Nothing for anyone else, who
/// cannot give a file away, or for a lock its owner already has. A lock that was there is
/// judged on the descriptor [`open_migration_lock`] opened (never a symbolic link, and
/// refused when anything but a regular file), and given only when it is root's, empty, and has
/// no other link: never another user's file, and never a file of root's linked in from elsewhere (a
/// hard link planted there would have had root give that file away).
fn give_lock_to_database_owner(lock: &std::fs::File, made: bool, database: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let (Ok(database), Ok(held)) = (std::fs::metadata(database), lock.metadata()) else {
        return;
    };
    if (held.uid(), held.gid()) == (database.uid(), database.gid()) {
        return;
    }
    let left_by_root = held.is_file() && held.uid() == 0 && held.nlink() == 1 && held.len() == 0;
    if !made && !left_by_root {
        return;
    }
    let owner = rustix::process::Uid::from_raw(database.uid());
    let group = rustix::process::Gid::from_raw(database.gid());
    if let Err(err) = rustix::fs::fchown(lock, Some(owner), Some(group)) {
        tracing::warn!(
            "the SQLite migration lock could not be given to the database file's owner (uid \
             {}): {}",
            database.uid(),
            std::io::Error::from(err)
        );
    }
}

/// The migration lock's file, beside the database's (a link's target's, [`resolved`]); none for a database in memory, which no
/// other process can open (sqlx names one `file:sqlx-in-memory-N`: a lock file of that name was
/// left in the working directory).
fn migration_lock_path(database: &Path) -> Option<std::ffi::OsString> {
    if is_in_memory(database) {
        return None;
    }
    // Beside the file SQLite opens: two links to one file take one lock.
    let mut lock_path = resolved(database).into_os_string();
    lock_path.push(".migrate-lock");
    Some(lock_path)
}

/// Takes and releases the write lock on a pooled connection, waiting `PROBE_BUSY_TIMEOUT` at
/// most; the connection's own busy timeout is restored whatever the probe came to, or, when it
/// could not be (the probe dropped at its caller's timeout meanwhile, or the restore failed),
/// the connection is closed rather than given back to the pool with the probe's. With
/// `write_a_row`, the transaction writes and deletes the probe's row and commits, which needs
/// space on the disk (taking the lock needs none).
pub(super) async fn probe_write(pool: &SqlitePool, write_a_row: bool) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let busy = |timeout: Duration| {
        sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {}", timeout.as_millis()))
    };
    let mut guard = CloseUnlessRestored(Some(pool.acquire().await?));
    let conn = guard.0.as_mut().expect("set above");
    sqlx::query(busy(PROBE_BUSY_TIMEOUT))
        .execute(&mut **conn)
        .await?;
    let probed = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(mut tx) if write_a_row => {
            match super::write_space_check_row::<sqlx::Sqlite>(&mut tx).await {
                Ok(()) => tx.commit().await,
                Err(err) => Err(err),
            }
        }
        Ok(tx) => tx.rollback().await,
        Err(err) => Err(err),
    };
    let restored = sqlx::query(busy(BUSY_TIMEOUT)).execute(&mut **conn).await;
    if restored.is_ok() {
        // Its own busy timeout again: back to the pool as any other.
        guard.0 = None;
    }
    probed?;
    restored.map(|_| ())
}

/// A pooled connection whose busy timeout is the probe's until taken out (`None`) once restored:
/// dropped holding it (the probe's future dropped mid-wait, or the restore failed), the
/// connection is closed, not returned to the pool where writes on it would give up on another
/// connection's lock after `PROBE_BUSY_TIMEOUT` instead of `BUSY_TIMEOUT`.
struct CloseUnlessRestored(Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>);

impl Drop for CloseUnlessRestored {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.0 {
            conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    /// A database in memory (sqlx names it `file:sqlx-in-memory-N`) is judged as no file in
    /// the working directory: run as root, check judged that directory for uid 10001.
    #[test]
    fn a_database_in_memory_is_no_file_to_judge() {
        for name in ["file:sqlx-in-memory-7", ":memory:"] {
            let file = Path::new(name);
            assert!(
                matches!(not_usable_by_server(file), ServerAccess::Allowed),
                "{name}"
            );
            assert_eq!(files_not_read_writable(file), None, "{name}");
        }
    }

    use super::*;

    /// Only the answers that mean "not for you" refuse a file: `access` with the effective
    /// user's rights is `faccessat2`, which a container's seccomp filter may answer EPERM (or a
    /// kernel ENOSYS, where rustix falls back only for ENOSYS), and any answer but a refusal is
    /// left for SQLite to judge on opening the file, as before the check was there.
    /// The advice's paths, pasted into a shell, name the files: absolute, and quoted.
    #[test]
    fn advice_quotes_a_path_for_a_shell() {
        let quoted = shell_quoted(Path::new("/data/it's my.db"));
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s {quoted}")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/data/it's my.db");
        assert_eq!(
            shell_quoted(Path::new("/data/edgegate.db")),
            "/data/edgegate.db"
        );
        let relative = shell_quoted(Path::new("edgegate.db"));
        assert!(Path::new(&relative).is_absolute(), "{relative}");
    }

    /// Only SQLite's SQLITE_CORRUPT family and SQLITE_NOTADB say that a file is damaged: any
    /// other error of `check`'s quick_check (a syntax error here standing for a busy database,
    /// a timeout or an I/O error) was reported as damage, with the advice to restore a backup.
    #[tokio::test]
    async fn only_corrupt_and_notadb_are_damage() {
        use anyhow::Context as _;
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let pool = SqlitePool::connect(&format!("sqlite://{}", garbage.display()))
            .await
            .unwrap();
        let err = sqlx::query("PRAGMA quick_check(1)")
            .fetch_one(&pool)
            .await
            .context("running PRAGMA quick_check")
            .unwrap_err();
        assert!(is_damage(&err), "{err:#}");
        pool.close().await;
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        let err = sqlx::query("PRAGMA quick_check(")
            .fetch_one(&pool)
            .await
            .context("running PRAGMA quick_check")
            .unwrap_err();
        assert!(!is_damage(&err), "{err:#}");
        pool.close().await;
        assert!(!is_damage(&anyhow::Error::new(sqlx::Error::PoolTimedOut)));
    }

    /// What `check` run as root found, for [`found_verdict`]: /data (its `owner`, group and
    /// mode, and whether it has an ACL) under / (root's, mode 0755), and `files` in it.
    fn found(directory: (u32, u32, u32, bool), files: &[(&str, u32, u32, u32)]) -> Found {
        let entry = |path: &str, (uid, gid, mode, acl): (u32, u32, u32, bool)| Entry {
            path: std::path::PathBuf::from(path),
            owner: Owner { uid, gid, mode },
            acl,
        };
        let database = files.iter().find(|(name, ..)| *name == "edgegate.db");
        Found {
            above: vec![entry("/", (0, 0, 0o40755, false))],
            directory: entry("/data", directory),
            files: files
                .iter()
                .map(|&(name, uid, gid, mode)| {
                    entry(&format!("/data/{name}"), (uid, gid, mode, false))
                })
                .collect(),
            created: database.map(|&(_, _, _, mode)| {
                let missing = ["-wal", "-shm"]
                    .into_iter()
                    .filter(|suffix| {
                        !files
                            .iter()
                            .any(|(name, ..)| *name == format!("edgegate.db{suffix}"))
                    })
                    .map(|suffix| std::path::PathBuf::from(format!("/data/edgegate.db{suffix}")))
                    .collect();
                (mode, missing)
            }),
        }
    }

    /// The user [`judged_server`] takes for serve's: `uid`, the owner of /data.
    fn serve(uid: u32) -> Server {
        Server {
            uid,
            gid: uid,
            whose: Some("the owner of /data".to_owned()),
        }
    }

    /// What `access` says, for an assertion's message.
    fn said(access: &ServerAccess) -> &str {
        match access {
            ServerAccess::Allowed => "allowed",
            ServerAccess::Refused(said) | ServerAccess::CannotTell(said) => said,
        }
    }

    /// Root, for want of another owner: serve's user is not known.
    const ROOT: Server = Server {
        uid: 0,
        gid: 0,
        whose: None,
    };

    /// `check` run as root judges a missing database's directory for the user serve runs as:
    /// root may create files in any directory, so it said "ok … not there yet; serve creates
    /// it" of a directory of root's with mode 0755, where serve (uid 10001) then stopped.
    #[test]
    fn a_missing_databases_directory_is_judged_for_the_serve_user() {
        let verdict = |uid: u32, gid: u32, mode: u32, acl: bool, server: &Server| -> ServerAccess {
            found_verdict(&found((uid, gid, mode, acl), &[]), server)
        };

        // Judged for uid 10001: a directory of root's, mode 0755, is not ok.
        let ServerAccess::Refused(problem) = verdict(0, 0, 0o40755, false, &serve(10_001)) else {
            panic!("a directory of root's, mode 0755, is no place uid 10001 can create files in");
        };
        assert!(
            problem.contains("/data") && problem.contains("uid 10001"),
            "{problem}"
        );
        // Its owner's and mode 0755: ok; its owner's without write: not ok.
        assert!(matches!(
            verdict(10_001, 10_001, 0o40755, false, &serve(10_001)),
            ServerAccess::Allowed
        ));
        assert!(matches!(
            verdict(10_001, 10_001, 0o40555, false, &serve(10_001)),
            ServerAccess::Refused(_)
        ));
        // A group of which uid 10001 may be a supplementary member, or an ACL: not judged.
        assert!(matches!(
            verdict(0, 50, 0o40775, false, &serve(10_001)),
            ServerAccess::CannotTell(_)
        ));
        assert!(matches!(
            verdict(0, 0, 0o40755, true, &serve(10_001)),
            ServerAccess::CannotTell(_)
        ));

        // Another user's (a bind mount of uid 1000's), which that user may create files in but
        // the image's user (uid 10001, as serve runs in the image) may not: said, not failed
        // (serve may run as uid 1000); nothing said where uid 10001 may too.
        let ServerAccess::CannotTell(note) = verdict(1000, 1000, 0o40755, false, &serve(1000))
        else {
            panic!("a directory of uid 1000's, mode 0755, said ok of for the image's user");
        };
        assert!(
            note.contains("uid 10001") && note.contains("/data") && note.contains("uid 1000 "),
            "{note}"
        );
        assert!(matches!(
            verdict(1000, 1000, 0o40777, false, &serve(1000)),
            ServerAccess::Allowed
        ));
        assert!(matches!(
            verdict(1000, 10_001, 0o40775, false, &serve(1000)),
            ServerAccess::Allowed
        ));
        // Neither uid 1000 nor uid 10001 may: failed, for uid 1000.
        let ServerAccess::Refused(problem) = verdict(1000, 1000, 0o40555, false, &serve(1000))
        else {
            panic!("a directory of uid 1000's, mode 0555, said ok of");
        };
        assert!(
            problem.contains("uid 1000 ") && !problem.contains("uid 10001"),
            "{problem}"
        );
        // Only its group, the image's (10001), may: it failed for uid 1000 though serve in the
        // image creates the database there; said, not failed (serve may run as uid 1000).
        let ServerAccess::CannotTell(note) = verdict(1000, 10_001, 0o40575, false, &serve(1000))
        else {
            panic!("a directory uid 10001 may write through its group failed");
        };
        assert!(
            note.contains("uid 1000 ") && note.contains("uid 10001 (the image's user) may"),
            "{note}"
        );

        // Root's directory, and no other owner to take for serve's: said for the image's user
        // (uid 10001), not failed (serve may run as root).
        let ServerAccess::CannotTell(note) = verdict(0, 0, 0o40755, false, &ROOT) else {
            panic!("a directory of root's, mode 0755, said ok of, run as root");
        };
        assert!(
            note.contains("cannot tell")
                && note.contains("uid 10001")
                && note.contains("/data")
                && note.contains(
                    "uid 0 (root, this command's user) may use the database there: change \
                     nothing if serve runs as it"
                ),
            "{note}"
        );
        // One uid 10001 may create files in: ok.
        for mode in [0o40777, 0o41777] {
            assert!(matches!(
                verdict(0, 0, mode, false, &ROOT),
                ServerAccess::Allowed
            ));
        }
        assert!(matches!(
            verdict(0, 10_001, 0o40775, false, &ROOT),
            ServerAccess::Allowed
        ));

        // A directory above that uid 10001 may not search: refused, naming it.
        let mut above = found((10_001, 10_001, 0o40755, false), &[]);
        above.above.push(Entry {
            path: std::path::PathBuf::from("/srv"),
            owner: Owner {
                uid: 0,
                gid: 0,
                mode: 0o40700,
            },
            acl: false,
        });
        let ServerAccess::Refused(problem) = found_verdict(&above, &serve(10_001)) else {
            panic!("a directory above of root's, mode 0700, said ok of for uid 10001");
        };
        assert!(
            problem.contains("/srv (uid 0, mode 700)") && problem.contains("searched"),
            "{problem}"
        );
    }

    /// An existing database, judged by `check` run as root: it judged the files for their
    /// owner (or the directory's, where root owns them) and not the directory, so a file of
    /// root's in a directory of root's passed, and so did uid 10001's file in root's directory,
    /// mode 0755, where serve (uid 10001) stops, unable to create the -wal and -shm.
    #[test]
    fn an_existing_database_is_judged_for_the_serve_user_and_the_image_user() {
        let db = "edgegate.db";
        // Root's file in root's directory: serve may run as root; uid 10001's refusal said.
        let ServerAccess::CannotTell(note) = found_verdict(
            &found((0, 0, 0o40755, false), &[(db, 0, 0, 0o100600)]),
            &ROOT,
        ) else {
            panic!("root's file in root's directory said ok of for the image's user");
        };
        assert!(
            note.contains("uid 10001")
                && note.contains("/data/edgegate.db")
                && note.contains("not every user it may run as may use the database"),
            "{note}"
        );
        // Its chown advised on a condition, not as the fix: serve as root needs none, and root
        // is told to change nothing if serve runs as it, as any other user that may is.
        assert!(
            note.contains(
                "uid 0 (root, this command's user) may use the database there: change nothing if \
                 serve runs as it; if serve runs as uid 10001 (the image's user), it cannot use \
                 the database: its directory /data (uid 0, mode 755)"
            ) && note.contains("chown 10001:10001 /data/edgegate.db")
                && !note.contains("serve run as"),
            "{note}"
        );
        // uid 10001's file in root's directory, mode 0755: failed, naming the directory.
        let ServerAccess::Refused(problem) = found_verdict(
            &found((0, 0, 0o40755, false), &[(db, 10_001, 10_001, 0o100600)]),
            &serve(10_001),
        ) else {
            panic!("uid 10001's file in root's directory said ok of");
        };
        assert!(
            problem.contains("its directory /data (uid 0, mode 755)")
                && problem.contains("uid 10001"),
            "{problem}"
        );
        // Both uid 10001's: ok.
        assert!(matches!(
            found_verdict(
                &found(
                    (10_001, 10_001, 0o40755, false),
                    &[(db, 10_001, 10_001, 0o100600)]
                ),
                &serve(10_001)
            ),
            ServerAccess::Allowed
        ));
        // uid 1000's, in a directory of uid 1000's: said for uid 10001, not failed.
        let ServerAccess::CannotTell(note) = found_verdict(
            &found((1000, 1000, 0o40755, false), &[(db, 1000, 1000, 0o100600)]),
            &serve(1000),
        ) else {
            panic!("uid 1000's file and directory said ok of for the image's user");
        };
        // A chown to uid 10001 stops serve run as uid 1000, which may use it: said on a
        // condition, with what to leave alone otherwise.
        assert!(
            note.contains(
                "uid 1000 (the owner of /data, taken for the user serve runs as) may use the \
                 database there: change nothing if serve runs as it"
            ) && note.contains("if serve runs as uid 10001 (the image's user), it cannot use")
                && !note.contains("serve run as"),
            "{note}"
        );
        // uid 1000's, mode 0575, group 10001: neither may use it, uid 1000 (its owner) not
        // writing it, uid 10001 not opening again the -wal and -shm SQLite creates for it with
        // that mode (owned by uid 10001, which mode 0575 gives no writing): failed.
        let ServerAccess::Refused(problem) = found_verdict(
            &found(
                (10_001, 10_001, 0o40755, false),
                &[(db, 1000, 10_001, 0o100575)],
            ),
            &serve(1000),
        ) else {
            panic!("a database file of mode 0575 said ok of");
        };
        assert!(problem.contains("chmod 600 /data/edgegate.db"), "{problem}");
        let ServerAccess::Refused(problem) = found_says(
            &found(
                (10_001, 10_001, 0o40755, false),
                &[(db, 1000, 10_001, 0o100575)],
            ),
            &serve(10_001),
        ) else {
            panic!("uid 10001 said to use a database file of mode 0575 it reads through its group");
        };
        assert!(
            problem.contains("/data/edgegate.db-wal is not there") && problem.contains("575"),
            "{problem}"
        );
        // Mode 0660, group 10001, in a directory group 10001 may write: uid 1000 may, and
        // uid 10001 through its group: ok.
        let group = found(
            (10_001, 10_001, 0o40775, false),
            &[(db, 1000, 10_001, 0o100660)],
        );
        let mut uid_1000 = serve(1000);
        uid_1000.gid = 10_001;
        let verdict = found_verdict(&group, &uid_1000);
        assert!(
            matches!(verdict, ServerAccess::Allowed),
            "{}",
            said(&verdict)
        );

        // uid 10001's file, group 1000 (a chown 10001 of uid 1000's file), in a directory of
        // uid 1000's, mode 0775: uid 10001 was judged with the file's group, which may write
        // the directory, and said ok, where the image's user (10001:10001, no other groups)
        // has only others' r-x and serve in the image stops; said (its supplementary groups
        // are not known here).
        let chowned = found(
            (1000, 1000, 0o40775, false),
            &[(db, 10_001, 1000, 0o100600)],
        );
        let owner = Server {
            uid: 10_001,
            gid: 1000,
            whose: Some("the owner of /data/edgegate.db".to_owned()),
        };
        let ServerAccess::CannotTell(note) = found_verdict(&chowned, &owner) else {
            panic!("uid 10001's file in uid 1000's directory, mode 0775, said ok of");
        };
        assert!(
            note.contains("uid 10001 (the image's user) may create the database in its directory /data (only its group (gid 1000)"),
            "{note}"
        );
        // Nothing refused: not said to be refused to any user.
        assert!(
            !note.contains("not every user") && note.contains("nor whether every user"),
            "{note}"
        );
        // Mode 0755: refused to both.
        let ServerAccess::Refused(problem) = found_verdict(
            &found(
                (1000, 1000, 0o40755, false),
                &[(db, 10_001, 1000, 0o100600)],
            ),
            &owner,
        ) else {
            panic!("uid 10001's file in uid 1000's directory, mode 0755, said ok of");
        };
        assert!(
            problem.contains("its directory /data (uid 1000, mode 755)"),
            "{problem}"
        );
        // Taken with the image's group: judged for it alone, the same.
        let mut image = owner;
        image.gid = 10_001;
        let ServerAccess::CannotTell(note) = found_verdict(&chowned, &image) else {
            panic!("uid 10001:10001's file in uid 1000's directory, mode 0775, said ok of");
        };
        assert!(note.contains("only its group (gid 1000)"), "{note}");
    }

    /// The common restore: root's file in the image user's directory. The refusal advised
    /// `chown 10001` (for check run as root, taking the directory's owner for serve's, and for
    /// serve and migrate run as uid 10001), leaving the file in root's group, where the note on
    /// the image's user advised `chown 10001:10001`: the image's uid gets its group too,
    /// whoever the advice is for; another uid, its own alone.
    #[test]
    fn the_image_users_chown_gives_its_group_too() {
        let restored = found(
            (10_001, 10_001, 0o40755, false),
            &[("edgegate.db", 0, 0, 0o100600)],
        );
        let ServerAccess::Refused(problem) = found_verdict(&restored, &serve(10_001)) else {
            panic!("root's file in uid 10001's directory said ok of");
        };
        assert!(
            problem.contains("chown 10001:10001 /data/edgegate.db;"),
            "{problem}"
        );
        let paths = [std::path::PathBuf::from("/data/edgegate.db")];
        for gid in [10_001, 0] {
            let this_process = Server {
                uid: 10_001,
                gid,
                whose: None,
            };
            let advice = give_back(&this_process, "must read and write it", &paths);
            assert!(
                advice.contains("chown 10001:10001 /data/edgegate.db;"),
                "gid {gid}: {advice}"
            );
        }
        let advice = give_back(&serve(1000), "must read and write it", &paths);
        assert!(advice.contains("chown 1000 /data/edgegate.db;"), "{advice}");
    }

    #[test]
    fn only_a_refusal_of_access_refuses_a_file() {
        use rustix::io::Errno;
        for errno in [Errno::ACCESS, Errno::ROFS] {
            assert!(is_refusal(errno), "{errno:?}");
        }
        for errno in [
            Errno::PERM,
            Errno::NOSYS,
            Errno::INVAL,
            Errno::NOENT,
            Errno::IO,
        ] {
            assert!(!is_refusal(errno), "{errno:?}");
        }
    }

    /// A read-only URL (`mode=ro`) creates no file, and fails as SQLite fails it: an empty file
    /// made beforehand was opened instead, and the migration failed on it later.
    #[tokio::test]
    async fn a_read_only_url_creates_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.db");
        let url = format!("sqlite://{}?mode=ro", path.display());
        assert!(connect(&url).await.is_err());
        assert!(!path.exists(), "a file was made");
    }

    /// A database in memory takes no lock file (one named after sqlx's in-memory name was left in
    /// the working directory by `migrate` and `serve`); a file's lock is beside it.
    #[tokio::test]
    async fn only_a_database_file_has_a_migration_lock_file() {
        for url in ["sqlite::memory:", "sqlite://:memory:"] {
            let pool = connect(url).await.unwrap();
            let database = pool.connect_options().get_filename().to_path_buf();
            assert_eq!(migration_lock_path(&database), None, "{url}: {database:?}");
            pool.close().await;
        }
        let path = std::path::Path::new("/data/edgegate.db");
        assert_eq!(
            migration_lock_path(path),
            Some("/data/edgegate.db.migrate-lock".into())
        );
    }

    /// Every connection commits with `synchronous=FULL`: in WAL mode NORMAL survives a crash of
    /// the process but not of the machine (a power loss rolls back the last commits), and a
    /// commit here is a promise made outward: a webhook answered 200 that Stripe will not send
    /// again, an SMS row whose idempotency key stops a second text.
    #[tokio::test]
    async fn every_connection_commits_durably() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        let pool = connect(&url).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut conn = pool.acquire().await.unwrap();
            let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            // 2 is FULL (0 OFF, 1 NORMAL, 3 EXTRA).
            assert_eq!(level, 2);
            held.push(conn);
        }
        drop(held);
        pool.close().await;
    }

    /// The file holds SMS bodies, phone numbers and customers' emails: a new one, and the WAL
    /// and shared-memory files SQLite writes beside it, are readable by their owner only.
    #[tokio::test]
    async fn a_new_database_file_and_its_wal_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgegate.db");
        let pool = connect(&format!("sqlite://{}", file.display()))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        let wal = dir.path().join("edgegate.db-wal");
        let shm = dir.path().join("edgegate.db-shm");
        for path in [&file, &wal, &shm] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        }
        pool.close().await;
    }

    /// An operator's own choice of mode for an existing file is kept.
    #[tokio::test]
    async fn an_existing_database_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgegate.db");
        std::fs::File::create(&file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let pool = connect(&format!("sqlite://{}", file.display()))
            .await
            .unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        pool.close().await;
    }

    /// A transaction SQLite ended by itself leaves no connection inside it. A COMMIT that fails
    /// for want of space ("database or disk is full", seen on a full disk) or on an I/O error
    /// rolls the transaction back in SQLite, while sqlx 0.9.0 still counted it open: its
    /// ROLLBACK on drop then failed ("no transaction is active"), and the connection went back
    /// to the pool counted inside a transaction (sqlx 0.9.1 sets its count back itself,
    /// transact-rs/sqlx#4473, so this test now holds with or without
    /// `leave_no_transaction_open`: it pins the behaviour, whichever part gives it). Each later transaction on it was a savepoint instead (of an
    /// outer one that the first rollback to a savepoint left open for ever, holding the write
    /// lock), whose commit reached no file: webhooks answered 200 were lost, and `BEGIN
    /// IMMEDIATE` (the SMS reservation, the readiness probe) failed. Here SQLite's own ending of
    /// the transaction is a COMMIT sent beside sqlx, which leaves sqlx's count as a failed
    /// COMMIT does.
    #[tokio::test]
    async fn a_transaction_sqlite_ended_by_itself_leaves_no_connection_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        let pool = connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("COMMIT").execute(&mut *tx).await.unwrap();
            // Dropped as `?` drops it after the failed COMMIT: sqlx's ROLLBACK fails.
        }
        for row in 0..4 {
            // A duplicate webhook's path: a transaction rolled back.
            let tx = pool.begin().await.unwrap();
            tx.rollback().await.unwrap();
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query("INSERT INTO t VALUES ($1)")
                .bind(row)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let reader = connect(&format!("{url}?mode=ro")).await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&reader)
            .await
            .unwrap();
        assert_eq!(rows, 4, "commits on the pool that no other connection sees");
        reader.close().await;
        pool.close().await;
    }

    /// A readiness probe dropped at its caller's timeout while it waited for the write lock
    /// (after setting the probe's 1 s busy timeout, before restoring the pool's 5 s) does not
    /// hand its connection back to the pool with the probe's timeout: writes on it would fail
    /// with SQLITE_BUSY after 1 s instead of 5 for the connection's life.
    #[tokio::test]
    async fn a_probe_dropped_mid_wait_leaves_no_connection_with_its_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        let pool = connect(&url).await.unwrap();
        let holder = connect(&url).await.unwrap();
        let mut lock = holder.begin_with("BEGIN IMMEDIATE").await.unwrap();
        let probe = tokio::time::timeout(Duration::from_millis(300), probe_write(&pool, false));
        assert!(
            probe.await.is_err(),
            "the probe took the lock another holds"
        );
        // Past the probe's busy timeout, so its BEGIN has failed and its connection is back.
        tokio::time::sleep(PROBE_BUSY_TIMEOUT + Duration::from_millis(500)).await;
        sqlx::query("SELECT 1").execute(&mut *lock).await.unwrap();
        lock.rollback().await.unwrap();
        let mut conns = Vec::new();
        // Every connection the pool may hold: the probe's slot came back, closed or not.
        for _ in 0..pool.options().get_max_connections() {
            let acquired = tokio::time::timeout(Duration::from_secs(2), pool.acquire()).await;
            conns.push(acquired.expect("acquired within 2 s").unwrap());
        }
        for conn in &mut conns {
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(
                busy,
                BUSY_TIMEOUT.as_millis() as i64,
                "a pooled connection's busy timeout"
            );
        }
        drop(conns);
        holder.close().await;
        pool.close().await;
    }
}
