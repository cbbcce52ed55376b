//! Recovering delivery statuses whose callbacks were lost. Twilio does not retry a status
//! callback (unless the callback URL sets connection overrides), and the final status is
//! usually the last one: a callback refused during a brief database outage (503) would leave the
//! message `queued` or `sent` for ever. A bounded pass asks Twilio (Fetch Message) for the status
//! of messages left unsettled a while, and stores it by the callbacks' own rank rule, so it
//! never moves a status back and applying it twice changes nothing.

use std::time::Duration;

use super::client::{CallError, TwilioApi};
use super::metrics::{SmsMetrics, StatusSource};
use super::status::{STATUS_RANKS, rank, status_applied};
use crate::clock::Clock;
use crate::config::Config;
use crate::store::{StatusChange, Store};

/// A message is asked about once its status has not changed for this long: until then, its
/// callbacks may still come.
pub const SETTLE: Duration = Duration::from_secs(10 * 60);
/// A message unchanged for longer is left as it is (Twilio reports no change that late).
pub const GIVE_UP: Duration = Duration::from_secs(72 * 3600);
/// The most messages one pass asks Twilio about, oldest change first.
pub const BATCH: usize = 50;
/// How often a pass runs.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// The rank of the final outcomes (`delivered`, `undelivered`, `failed`, …): a message below it
/// may still move.
const FINAL_RANK: i64 = 4;

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Messages Twilio was asked about.
    pub fetched: usize,
    /// Messages whose stored status moved forward.
    pub applied: usize,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// One pass: the messages with a SID whose status is not final, unchanged for `SETTLE` but not
/// for `GIVE_UP`, and due a check (see `Store::sms_due_status_check`: the wait after a check
/// grows with how long the message had been unchanged), at most `BATCH`, oldest first. Each is
/// fetched and its status applied as a callback's would be; every one fetched is noted as
/// checked, whatever Twilio answered. A failed fetch (an error, a timeout, a message Twilio
/// does not know) is logged by its code and status and the pass goes on; throttling ends it.
/// Each status applied is logged and counted as a callback's is, under `source="recovery"`.
/// Fails only when the database cannot be read.
pub async fn recover_statuses(
    store: &Store,
    api: &TwilioApi,
    clock: &Clock,
    metrics: &SmsMetrics,
) -> anyhow::Result<Recovered> {
    let unsettled: Vec<&str> = STATUS_RANKS
        .iter()
        .filter(|(_, rank)| *rank < FINAL_RANK)
        .map(|(status, _)| *status)
        .collect();
    let now = clock.now_ms();
    let due = store
        .sms_due_status_check(
            &unsettled,
            (
                now.saturating_sub(millis(GIVE_UP)),
                now.saturating_sub(millis(SETTLE)),
            ),
            millis(SETTLE),
            now,
            BATCH,
        )
        .await?;
    let mut recovered = Recovered::default();
    for (id, sid) in due {
        let fetched = api.fetch_message(&sid).await;
        recovered.fetched += 1;
        let now = clock.now_ms();
        if let Err(err) = store.mark_sms_status_checked(&id, now).await {
            tracing::warn!(
                %id,
                error = crate::error::causes(&err),
                "SMS status check not noted"
            );
        }
        let message = match fetched {
            Ok(message) => message,
            Err(CallError::Throttled { .. }) => {
                tracing::warn!(%id, "Twilio throttled the SMS status recovery; the pass ends");
                break;
            }
            // Logged by code and status: never the number or the body.
            Err(CallError::Rejected { http_status, body }) => {
                tracing::warn!(
                    %id,
                    %sid,
                    http_status,
                    twilio_error = body.code,
                    "SMS status not recovered: Twilio refused the fetch"
                );
                continue;
            }
            Err(err @ (CallError::NotSent(_) | CallError::Unconfirmed(_))) => {
                tracing::warn!(%id, %sid, error = %err, "SMS status not recovered");
                continue;
            }
        };
        let Some(status_rank) = rank(&message.status) else {
            tracing::warn!(%id, %sid, status = %message.status,
                "SMS status recovery: Twilio reported a status we do not know; ignored");
            continue;
        };
        match store
            .apply_sms_status(
                (&sid, None),
                (&message.status, status_rank),
                STATUS_RANKS,
                (message.error_code, message.error_message.as_deref()),
                now,
            )
            .await
        {
            Ok(StatusChange::Applied {
                id: applied,
                previous,
            }) => {
                recovered.applied += 1;
                status_applied(
                    metrics,
                    StatusSource::Recovery,
                    (&applied, &sid),
                    (&previous, &message.status),
                    message.error_code,
                );
            }
            Ok(StatusChange::Stale | StatusChange::UnknownSid) => {}
            Err(err) => {
                tracing::warn!(%id, %sid, error = crate::error::causes(&err),
                    "SMS status fetched but not stored");
            }
        }
    }
    Ok(recovered)
}

/// Runs `recover_statuses` every `INTERVAL`, from when the store is ready, until the handle is
/// aborted; `None` when Twilio is not configured (no account SID or auth token).
pub fn spawn_status_recovery(
    store: Store,
    http: &reqwest::Client,
    config: &Config,
    clock: Clock,
    metrics: SmsMetrics,
) -> Option<tokio::task::JoinHandle<()>> {
    let api = TwilioApi::from_config(http, &config.twilio)?;
    Some(tokio::spawn(async move {
        // Nothing to recover from a schema not in place yet (it would fail every pass).
        store.wait_until_ready().await;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match recover_statuses(&store, &api, &clock, &metrics).await {
                Ok(recovered) if recovered.fetched > 0 => tracing::info!(
                    fetched = recovered.fetched,
                    applied = recovered.applied,
                    "SMS status recovery pass"
                ),
                Ok(_) => {}
                Err(err) => tracing::warn!(
                    error = crate::error::causes(&err),
                    "SMS status recovery pass failed"
                ),
            }
        }
    }))
}
