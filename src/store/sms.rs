//! SMS rows: a send is reserved (idempotency key and send limits checked, row written) in one
//! serialized transaction, so the rules hold across every instance on the database; delivery
//! statuses then only move forward, compared in SQL so concurrent callbacks cannot regress them.

use anyhow::Context as _;

use sqlx::{FromRow, Transaction};

use super::engine::{BindExt as _, Engine, Execute as _};
use super::{Backend, Store};

/// Postgres advisory lock key that serializes SMS reservations across instances ("edgesms" in
/// ASCII); distinct from any other lock key of the service.
const SMS_RESERVATION_LOCK: i64 = 0x0065_6467_6573_6d73;

/// How long a reservation may wait in all on PostgreSQL, for its permit, its pool connection and
/// the lock together, before it gives up (nothing reserved, the caller answers 503). Each wait
/// takes what the ones before it left: separately bounded they added up to 8-10 s. 5 s, not
/// more: the reservation comes out of the send's 18 s budget, and a longer wait would leave no
/// room for Twilio's 10 s call (a queue of 5 s is some 25 sends behind one another on a database
/// 50 ms away).
const RESERVATION_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// Bounds on the reservation's PostgreSQL transaction, set in it alone (`SET LOCAL`), given what
/// is `left` of [`RESERVATION_BUDGET`]. Reservations queued behind one another hold the lock for
/// milliseconds each; a holder whose machine vanished without closing its connection would
/// otherwise keep it until TCP keepalive gives up (~2 h), every send on every instance waiting
/// behind it with a pool connection held, until the pool ran out for the webhooks too. A wait
/// past `lock_timeout` fails (55P03, "not now" to `is_unavailable`: nothing reserved, the caller
/// answers 503); a holder silent inside its transaction for
/// `idle_in_transaction_session_timeout` (5 s) is ended by the server, its lock freed.
fn reservation_timeouts(left: std::time::Duration) -> String {
    // 0 would mean no timeout at all.
    let lock_ms = left.as_millis().max(1);
    format!(
        "SET LOCAL lock_timeout = '{lock_ms}ms'; \
         SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
        RESERVATION_BUDGET.as_millis()
    )
}

/// How many of this store's reservations may hold a pool connection at once (PostgreSQL). They
/// queue on one lock, so more would add nothing but connections held while waiting: with every
/// send waiting behind a slow or stuck holder, the pool (10) ran out and Stripe's webhooks
/// failed. Two, so the next one has its connection ready as the lock passes.
pub(super) const RESERVATION_PERMITS: usize = 2;

/// How many times a status is read and compared-and-set before it is taken as overtaken
/// (`Store::apply_sms_status`): each failed try means another write moved the row meanwhile.
const STATUS_TRIES: usize = 8;

const HOUR_MS: i64 = 3_600_000;
const MINUTE_MS: i64 = 60_000;
/// Restamps rows stamped more than `STAMPED_AHEAD_MS` after now (`$2`) to an hour before now
/// (`$1`); see `reserve_in`. Their `updated_at` too, when it is as far ahead: the recovery pass asks Twilio only about rows not
/// updated for a while, which a row updated "tomorrow" would not be for a day.
const RESTAMP_AHEAD: &str = "UPDATE sms_messages SET created_at = $1, \
    updated_at = CASE WHEN updated_at > $2 THEN $1 ELSE updated_at END WHERE created_at > $2";

fn warn_restamped(rows: u64, now: i64) {
    if rows > 0 {
        tracing::warn!(
            rows,
            now,
            "SMS rows stamped more than an hour after now (written while a wall clock ran ahead, \
             since set back) are restamped an hour before now: they count in no send limit, and \
             one left accepted is swept as unknown"
        );
    }
}

/// How far after now a row may be stamped and still be taken at its stamp: by an instance whose
/// clock is fast, up to the longest window. One stamped further ahead was stamped while a wall
/// clock ran ahead, since set back (see `reserve_in`).
const STAMPED_AHEAD_MS: i64 = HOUR_MS;

/// The sweep of messages reserved and never answered (`Store::mark_unanswered_sms_unknown`).
/// `(twilio_sid || '') IS NULL` is `twilio_sid IS NULL` written so that SQLite cannot search the
/// SID's unique index for it: without statistics it took that index, and so read every row ever
/// kept without a SID (failed sends, `unknown` ones) under its write lock every minute, instead
/// of the few `accepted` ones of the partial index `sms_messages_accepted` (PostgreSQL takes the
/// partial index either way).
const UNANSWERED_SWEEP: &str = "UPDATE sms_messages SET status = 'unknown', \
    error_message = $1, updated_at = $2 \
    WHERE status = 'accepted' AND (twilio_sid || '') IS NULL AND created_at < $3";

const COLUMNS: &str = "id, idempotency_key, to_number, body, status, twilio_sid, error_code, \
                       error_message, created_at, updated_at, attempt";

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct SmsMessage {
    pub id: String,
    pub idempotency_key: Option<String>,
    pub to_number: String,
    pub body: String,
    pub status: String,
    pub twilio_sid: Option<String>,
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    #[sqlx(rename = "created_at")]
    pub created_at_ms: i64,
    #[sqlx(rename = "updated_at")]
    pub updated_at_ms: i64,
    /// Which reservation of the message this is: 1 when it was written, one more each time it
    /// was reopened ([`Reservation::Reopened`]). What Twilio answered is stored for the
    /// reservation that asked it alone (`Store::record_sms_send`).
    pub attempt: i64,
}

/// A message to reserve before it is handed to Twilio.
#[derive(Clone, Copy, Debug)]
pub struct NewSms<'a> {
    pub id: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub to_number: &'a str,
    pub body: &'a str,
    /// The status the row starts with, before Twilio has seen it.
    pub status: &'a str,
    /// Twilio error codes that refuse the message itself (its recipient or its body): a row
    /// under the same key refused with one of them is replayed, never sent again. A refusal
    /// with any other code (our credentials, account or sender, Twilio's queue) created
    /// nothing at Twilio and is reopened like a send Twilio never took.
    pub replayed_error_codes: &'a [i64],
}

/// What the call to Twilio came to, for the row reserved before it.
#[derive(Clone, Copy, Debug)]
pub struct SendResult<'a> {
    pub status: &'a str,
    pub twilio_sid: Option<&'a str>,
    pub error_code: Option<i64>,
    pub error_message: Option<&'a str>,
}

/// The send limits, counted over every row in the database but those Twilio never took
/// (`failed` without a SID).
#[derive(Clone, Copy, Debug)]
pub struct SmsLimits {
    pub per_recipient_per_hour: u32,
    pub per_minute: u32,
}

/// What reserving a send came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// A new row: this caller, and only this one, may send it.
    Created(SmsMessage),
    /// The idempotency key was used before; this is its message, which must not be sent again.
    Existing(SmsMessage),
    /// The idempotency key's earlier send of this same message certainly never reached Twilio
    /// (see [`Store::reserve_sms`]): its row is reserved again, for this caller only to send.
    Reopened(SmsMessage),
    /// A limit is reached; a slot frees in this many milliseconds.
    Limited { retry_after_ms: i64 },
}

/// What a delivery status did to the stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Message `id` moved from `previous` to the status.
    Applied { id: String, previous: String },
    /// The message already has this status or a later one.
    Stale,
    /// No message has this SID.
    UnknownSid,
}

/// The reservation's reads and write, the same SQL on both engines. `tx` must already hold the
/// backend's serialization (advisory lock or SQLite's write lock).
async fn reserve_in<DB: Engine>(
    tx: &mut Transaction<'_, DB>,
    new: NewSms<'_>,
    limits: SmsLimits,
    clock: impl Fn() -> i64,
) -> Result<Reservation, sqlx::Error>
where
    SmsMessage: for<'r> FromRow<'r, DB::Row>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
{
    // Read once the lock is held, so rows are stamped in the order they were admitted.
    let now = clock();
    // The newest `limit` rows in each window: when there are that many, the oldest of them is
    // the one whose expiry frees a slot. A row `failed` without a SID never reached anyone
    // (Twilio could not be reached, throttled, or refused it): an outage must not use up the
    // limits. A row stamped ahead of now counts from now until its stamp is a window old:
    // another instance whose clock is fast (by up to `STAMPED_AHEAD_MS`) is held to the limits
    // its sends share with ours, and the wait asked for is never longer than the window.
    let created_at = |row: DB::Row| <(i64,)>::from_row(&row).map(|(at,)| at);
    let global_sql = "SELECT created_at FROM sms_messages WHERE created_at > $1 \
                      AND (twilio_sid IS NOT NULL OR status <> 'failed') \
                      ORDER BY created_at DESC LIMIT $2";
    let read_global = async |tx: &mut Transaction<'_, DB>| {
        sqlx::query::<DB>(global_sql)
            .bind_value(now - MINUTE_MS)
            .bind_value(i64::from(limits.per_minute))
            .try_map(created_at)
            .fetch_all(tx.executor())
            .await
    };
    let mut global: Vec<i64> = read_global(tx).await?;
    // Newest first: a row stamped further ahead than any instance's clock can be was stamped
    // while a wall clock ran that far ahead, since set back (a VM restored, NTP stepping a clock
    // wrong at boot). Counted at its stamp it would fill the windows again when our clock came
    // round to it (a day later for a clock a day ahead), and a send still `accepted` would look
    // younger than zero for as long, answered 409 and never swept. Its true time is unknown:
    // every such row is stamped a window before now, once and for all, and so counts in no
    // window and ages as any earlier row (a send `accepted` is then one whose sender is gone).
    if global
        .first()
        .is_some_and(|&newest| newest > now + STAMPED_AHEAD_MS)
    {
        let restamped = sqlx::query::<DB>(RESTAMP_AHEAD)
            .bind_value(now - HOUR_MS)
            .bind_value(now + STAMPED_AHEAD_MS)
            .execute(tx.executor())
            .await?;
        warn_restamped(DB::rows_affected(&restamped), now);
        global = read_global(tx).await?;
    }
    let mut reopened = None;
    if let Some(key) = new.idempotency_key {
        let sql = format!("SELECT {COLUMNS} FROM sms_messages WHERE idempotency_key = $1");
        let existing = sqlx::query::<DB>(sqlx::AssertSqlSafe(sql))
            .bind_value(key)
            .try_map(|row: DB::Row| SmsMessage::from_row(&row))
            .fetch_optional(tx.executor())
            .await?;
        match existing {
            Some(message) if never_taken(&message, &new) => reopened = Some(message),
            Some(message) => return Ok(Reservation::Existing(message)),
            None => {}
        }
    }
    let recipient: Vec<i64> = sqlx::query::<DB>(
        "SELECT created_at FROM sms_messages WHERE to_number = $1 AND created_at > $2 \
         AND (twilio_sid IS NOT NULL OR status <> 'failed') \
         ORDER BY created_at DESC LIMIT $3",
    )
    .bind_value(new.to_number)
    .bind_value(now - HOUR_MS)
    .bind_value(i64::from(limits.per_recipient_per_hour))
    .try_map(created_at)
    .fetch_all(tx.executor())
    .await?;
    let wait = [
        wait_for_slot(&recipient, limits.per_recipient_per_hour, HOUR_MS, now),
        wait_for_slot(&global, limits.per_minute, MINUTE_MS, now),
    ]
    .into_iter()
    .flatten()
    .max();
    if let Some(retry_after_ms) = wait {
        return Ok(Reservation::Limited { retry_after_ms });
    }
    if let Some(message) = reopened {
        // Stamped anew: the send is counted in the windows from now, and the sweep of rows
        // left `accepted` measures its age from now. Numbered anew: a write of the earlier
        // send's answer, tried again, no longer applies to the row.
        sqlx::query::<DB>(
            "UPDATE sms_messages SET status = $1, error_code = NULL, error_message = NULL, \
             created_at = $2, updated_at = $2, attempt = attempt + 1 WHERE id = $3",
        )
        .bind_value(new.status)
        .bind_value(now)
        .bind_value(message.id.as_str())
        .execute(tx.executor())
        .await?;
        return Ok(Reservation::Reopened(SmsMessage {
            status: new.status.to_owned(),
            error_code: None,
            error_message: None,
            created_at_ms: now,
            updated_at_ms: now,
            attempt: message.attempt + 1,
            ..message
        }));
    }
    sqlx::query::<DB>(
        "INSERT INTO sms_messages (id, idempotency_key, to_number, body, status, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
    )
    .bind_value(new.id)
    .bind_value(new.idempotency_key.map(str::to_owned))
    .bind_value(new.to_number)
    .bind_value(new.body)
    .bind_value(new.status)
    .bind_value(now)
    .execute(tx.executor())
    .await?;
    Ok(Reservation::Created(SmsMessage {
        id: new.id.to_owned(),
        idempotency_key: new.idempotency_key.map(str::to_owned),
        to_number: new.to_number.to_owned(),
        body: new.body.to_owned(),
        status: new.status.to_owned(),
        twilio_sid: None,
        error_code: None,
        error_message: None,
        created_at_ms: now,
        updated_at_ms: now,
        attempt: 1,
    }))
}

/// Whether `message`, found under `new`'s idempotency key, is `new` and Twilio certainly did
/// not take it: `failed` without a SID, and without a Twilio error code (the connection was
/// never made, or Twilio throttled every attempt) or with one that is not about the message
/// (not in `new.replayed_error_codes`: a refused credential, account or sender, which a retry
/// may find mended). A refusal of the message itself would only be refused again; an
/// `unknown` message may have been sent.
fn never_taken(message: &SmsMessage, new: &NewSms<'_>) -> bool {
    message.status == "failed"
        && message.twilio_sid.is_none()
        && message
            .error_code
            .is_none_or(|code| !new.replayed_error_codes.contains(&code))
        && message.to_number == new.to_number
        && message.body == new.body
}

/// How long until a window holding `newest` (newest first, at most `limit` long) has room, if
/// it is full. Bounded by the window, as another machine's clock may run ahead of ours.
fn wait_for_slot(newest: &[i64], limit: u32, window_ms: i64, now: i64) -> Option<i64> {
    let full = newest.len() >= usize::try_from(limit).unwrap_or(usize::MAX);
    full.then(|| newest.last())
        .flatten()
        .map(|oldest| (oldest + window_ms - now).clamp(1, window_ms))
}

impl Store {
    /// Checks the idempotency key and the send limits and, when both allow it, writes the row —
    /// all under one lock shared by every instance, so two instances can neither both send one
    /// key nor both take the last slot. `clock` (epoch milliseconds) is read under the lock.
    /// A key whose earlier send of the same message Twilio certainly did not take (`failed`
    /// without a SID, and without a Twilio error code or with one not in
    /// `new.replayed_error_codes`) reserves that row again, under the limits, as `Reopened`;
    /// any other earlier row is `Existing`.
    pub async fn reserve_sms(
        &self,
        new: NewSms<'_>,
        limits: SmsLimits,
        clock: impl Fn() -> i64,
    ) -> anyhow::Result<Reservation> {
        let reserved: Result<Reservation, sqlx::Error> = match &self.backend {
            Backend::Sqlite(pool) => {
                async {
                    // sqlx's begin() is DEFERRED: two connections could both count, then both
                    // write. IMMEDIATE takes the file's write lock before the first read, and
                    // other processes on the file wait for it (busy timeout).
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                    let reservation = reserve_in(&mut tx, new, limits, &clock).await?;
                    tx.commit().await?;
                    Ok(reservation)
                }
                .await
            }
            Backend::Postgres(pool) => {
                async {
                    // One budget for the permit, the connection and the lock. A wait past it
                    // is reported as the pool's own timeout, which is what it stands in for:
                    // the database not to be had now, nothing reserved (503, `is_unavailable`).
                    let deadline = tokio::time::Instant::now() + RESERVATION_BUDGET;
                    let _permit =
                        tokio::time::timeout_at(deadline, self.sms_reservations.acquire())
                            .await
                            .map_err(|_| sqlx::Error::PoolTimedOut)?
                            .map_err(|_| sqlx::Error::PoolClosed)?;
                    let mut tx = tokio::time::timeout_at(deadline, pool.begin())
                        .await
                        .map_err(|_| sqlx::Error::PoolTimedOut)??;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    sqlx::raw_sql(sqlx::AssertSqlSafe(reservation_timeouts(left)))
                        .execute(&mut *tx)
                        .await?;
                    // Held across the count and the insert; released at commit or rollback.
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(SMS_RESERVATION_LOCK)
                        .execute(&mut *tx)
                        .await?;
                    // What is left of the budget bounded the wait for the lock only: the count
                    // and the insert wait on a row as every other statement does.
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "SET LOCAL lock_timeout = '{}ms'",
                        super::postgres::LOCK_TIMEOUT.as_millis()
                    )))
                    .execute(&mut *tx)
                    .await?;
                    let reservation = reserve_in(&mut tx, new, limits, &clock).await?;
                    tx.commit().await?;
                    Ok(reservation)
                }
                .await
            }
        };
        reserved.context("reserving the SMS")
    }

    /// Records what handing message `id` to Twilio came to, for its reservation `attempt`
    /// ([`SmsMessage::attempt`]): its SID and status, or why it was not sent. Nothing changes
    /// once the row was reserved again: a send's write tried again after its failure was stored
    /// and the row reopened would set the new send's row back to `failed`, and the next request
    /// with its key would text again. Repeating the write is otherwise harmless: it only fills
    /// in the row. Whether the row was still this reservation's (false: nothing was written).
    pub async fn record_sms_send(
        &self,
        (id, attempt): (&str, i64),
        result: SendResult<'_>,
        now_ms: i64,
    ) -> anyhow::Result<bool> {
        // A status callback that came first (it found the row by id and stored the SID) is
        // newer than the create answer: the answer then only fills in what is missing.
        let sql = "UPDATE sms_messages SET \
                   status = CASE WHEN twilio_sid IS NULL THEN $1 ELSE status END, \
                   error_code = CASE WHEN twilio_sid IS NULL THEN $3 ELSE error_code END, \
                   error_message = CASE WHEN twilio_sid IS NULL THEN $4 ELSE error_message END, \
                   twilio_sid = COALESCE(twilio_sid, $2), updated_at = $5 \
                   WHERE id = $6 AND attempt = $7";
        let args = [
            result.status.into(),
            result.twilio_sid.into(),
            result.error_code.into(),
            result.error_message.into(),
            now_ms.into(),
            id.into(),
            attempt.into(),
        ];
        self.execute(sql, &args)
            .await
            .map(|rows| rows > 0)
            .context("recording the SMS send")
    }

    /// Moves the message Twilio calls `twilio_sid` to `status` only if that is later than its
    /// current one: `ranks` orders the statuses (one not in it ranks 0), `rank` is `status`'s
    /// place in it. The status's `error_code` and `error_message` (or none) replace the stored
    /// ones with it: what the send's own failure said, why its outcome was unknown, is not about
    /// the status Twilio reports. A callback carries no description, so it clears the stored
    /// one; the recovery pass has Twilio's from the message resource. A status that does not
    /// move the message changes nothing. The SID names the message: `id`
    /// (from the callback URL) only finds a message when no message has that SID yet, and then
    /// only one whose SID is not stored yet, which takes it. A callback pairing one message's id
    /// with another's SID is so the other's, and the first never takes a SID that is not its
    /// own (the unique SID column refused that, a 500, and the status was lost).
    ///
    /// The status read is written back only if it is still the row's (compare and set), so two
    /// callbacks racing cannot leave the earlier status last; a row that moved meanwhile, or a
    /// SID another row took meanwhile, is read again.
    pub async fn apply_sms_status(
        &self,
        (twilio_sid, id): (&str, Option<&str>),
        (status, rank): (&str, i64),
        ranks: &[(&str, i64)],
        (error_code, error_message): (Option<i64>, Option<&str>),
        now_ms: i64,
    ) -> anyhow::Result<StatusChange> {
        let rank_of = |current: &str| {
            ranks
                .iter()
                .find(|(name, _)| *name == current)
                .map_or(0, |(_, rank)| *rank)
        };
        for _ in 0..STATUS_TRIES {
            let Some((found, current)) = self
                .sms_status_target(twilio_sid, id)
                .await
                .context("reading the SMS")?
            else {
                return Ok(StatusChange::UnknownSid);
            };
            if rank_of(&current) >= rank {
                return Ok(StatusChange::Stale);
            }
            // The status brings its own error code and description, none included: a code an
            // earlier status carried (30008 on `sent`) is not the later one's (`delivered`).
            let update = "UPDATE sms_messages SET status = $1, error_code = $2, \
                          error_message = $7, updated_at = $3, twilio_sid = $4 \
                          WHERE id = $5 AND status = $6 AND (twilio_sid = $4 OR twilio_sid IS NULL)";
            let args = [
                status.into(),
                error_code.into(),
                now_ms.into(),
                twilio_sid.into(),
                found.as_str().into(),
                current.as_str().into(),
                error_message.into(),
            ];
            match self.execute(update, &args).await {
                Ok(0) => {}
                Ok(_) => {
                    return Ok(StatusChange::Applied {
                        id: found,
                        previous: current,
                    });
                }
                // Another message took the SID since it was looked for: the status is that one's.
                Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {}
                Err(err) => return Err(err).context("updating the SMS status"),
            }
        }
        // Every read was overtaken by another write: the row has moved on without this status.
        Ok(StatusChange::Stale)
    }

    /// The message a status for `twilio_sid` is about, and its status: the one with that SID,
    /// else message `id` if its SID is not stored yet.
    async fn sms_status_target(
        &self,
        twilio_sid: &str,
        id: Option<&str>,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        let by_sid = with_pool!(self, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT id, status FROM sms_messages WHERE twilio_sid = $1",
            )
            .bind(twilio_sid)
            .fetch_optional(pool)
            .await
        })?;
        let Some(id) = id.filter(|_| by_sid.is_none()) else {
            return Ok(by_sid);
        };
        with_pool!(self, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT id, status FROM sms_messages WHERE id = $1 AND twilio_sid IS NULL",
            )
            .bind(id)
            .fetch_optional(pool)
            .await
        })
    }

    /// Restamps the rows stamped more than an hour after `now_ms` an hour before it, as a
    /// reservation does when it meets one (see `reserve_in`), so that no such row waits for a
    /// send to come: left until our clock nears its stamp, it would count in the limits again.
    /// Returns how many rows moved.
    pub async fn restamp_sms_stamped_ahead(&self, now_ms: i64) -> anyhow::Result<u64> {
        let args = [
            (now_ms - HOUR_MS).into(),
            (now_ms + STAMPED_AHEAD_MS).into(),
        ];
        let rows = self
            .execute(RESTAMP_AHEAD, &args)
            .await
            .context("restamping SMS rows stamped ahead")?;
        warn_restamped(rows, now_ms);
        Ok(rows)
    }

    /// Marks every message still `accepted` without a Twilio SID (reserved, Twilio's answer
    /// never recorded) and created before `created_before` as `unknown`, with `reason`: its
    /// sender died or lost the database mid-send, so Twilio may have it, and it is never sent
    /// again. Returns how many rows moved. A message with a SID was answered: through a
    /// Messaging Service Twilio's own first status is `accepted` too. A sender that is in fact
    /// still running records its answer over this afterwards, which is what should happen. The
    /// statuses are literals so the partial index serves it.
    pub async fn mark_unanswered_sms_unknown(
        &self,
        created_before: i64,
        reason: &str,
        now_ms: i64,
    ) -> anyhow::Result<u64> {
        self.execute(
            UNANSWERED_SWEEP,
            &[reason.into(), now_ms.into(), created_before.into()],
        )
        .await
        .context("marking unanswered SMS unknown")
    }

    /// Messages with a Twilio SID whose status is one of `unsettled` (statuses Twilio may still
    /// move on from), last changed at or before `changed_before` and after `changed_after`, and
    /// due a check: never checked, or last checked at least `min_wait_ms` ago and at least as
    /// long ago as the row had been unchanged when it was checked (so the waits between checks
    /// of a row that does not move roughly double). At most `limit`, oldest change first, as
    /// `(id, twilio_sid)`. Names in `unsettled` that are not plain lower-case words are left
    /// out, since they are spliced as literals.
    pub async fn sms_due_status_check(
        &self,
        unsettled: &[&str],
        (changed_after, changed_before): (i64, i64),
        min_wait_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let names: Vec<String> = unsettled
            .iter()
            .filter(|status| status.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map(|status| format!("'{status}'"))
            .collect();
        if names.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, twilio_sid FROM sms_messages WHERE twilio_sid IS NOT NULL \
             AND status IN ({}) AND updated_at > $1 AND updated_at <= $2 \
             AND (status_checked_at IS NULL OR (status_checked_at <= $3 - $4 \
             AND status_checked_at - updated_at <= $3 - status_checked_at)) \
             ORDER BY updated_at, id LIMIT $5",
            names.join(", ")
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let due = with_pool!(self, |pool| {
            sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql.clone()))
                .bind(changed_after)
                .bind(changed_before)
                .bind(now_ms)
                .bind(min_wait_ms)
                .bind(limit)
                .fetch_all(pool)
                .await
        })
        .context("reading the SMS due a status check")?;
        Ok(due)
    }

    /// Notes that Twilio was asked for message `id`'s status at `now_ms`, whatever came of it.
    pub async fn mark_sms_status_checked(&self, id: &str, now_ms: i64) -> anyhow::Result<()> {
        self.execute(
            "UPDATE sms_messages SET status_checked_at = $1 WHERE id = $2",
            &[now_ms.into(), id.into()],
        )
        .await
        .map(|_| ())
        .context("noting the SMS status check")
    }

    pub async fn sms_message(&self, id: &str) -> anyhow::Result<Option<SmsMessage>> {
        let sql = format!("SELECT {COLUMNS} FROM sms_messages WHERE id = $1");
        let message = with_pool!(self, |pool| {
            sqlx::query_as::<_, SmsMessage>(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(pool)
                .await
        })
        .context("reading the SMS")?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_full_only_at_its_limit_and_frees_when_its_oldest_counted_row_expires() {
        assert_eq!(wait_for_slot(&[30, 20], 3, 100, 40), None);
        assert_eq!(wait_for_slot(&[30, 20, 10], 3, 100, 40), Some(70));
        assert_eq!(wait_for_slot(&[30, 20, 10], 3, 100, 110), Some(1));
        // A row stamped ahead of our clock never asks for more than the window.
        assert_eq!(wait_for_slot(&[90, 80, 70], 3, 100, 40), Some(100));
        assert_eq!(wait_for_slot(&[], 0, 100, 40), None);
    }

    /// The sweep runs every minute holding SQLite's write lock: it must read the `accepted` rows
    /// alone (the partial index `sms_messages_accepted`), not every row without a Twilio SID,
    /// which SQLite picked by the SID's unique index: every failed and `unknown` send ever
    /// kept, 135-162 ms a sweep at 118,000 such rows, webhooks waiting behind it.
    #[tokio::test]
    async fn the_unanswered_sweep_reads_only_accepted_rows_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgegate.db").display());
        let pool = crate::store::sqlite::connect(&url).await.unwrap();
        crate::store::sqlite::migrate(&pool).await.unwrap();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {UNANSWERED_SWEEP}"
        )))
        .bind("reason")
        .bind(0_i64)
        .bind(0_i64)
        .fetch_all(&pool)
        .await
        .unwrap();
        // Each row of the plan: id, parent, unused, detail.
        let plan = rows
            .iter()
            .map(|row| sqlx::Row::get::<String, _>(row, 3))
            .collect::<Vec<_>>()
            .join("; ");
        assert!(
            plan.contains("USING INDEX sms_messages_accepted"),
            "the sweep's plan: {plan}"
        );
        pool.close().await;
    }
}
