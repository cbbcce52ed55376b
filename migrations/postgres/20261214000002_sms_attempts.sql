-- Each reservation of a message is numbered: 1 when the row is written, one more each time a
-- send Twilio never took is reserved again under its idempotency key. The write of what Twilio
-- answered names the reservation it answers, and applies only while the row is still that
-- one's: a failure's write tried again after the row was reopened (it had committed, but its
-- answer was lost) set the reopened send's row back to `failed`, and the next request with the
-- key sent the text a second time.
-- migrations/sqlite and migrations/postgres hold the same version and name.
ALTER TABLE sms_messages ADD COLUMN attempt BIGINT NOT NULL DEFAULT 1;
