-- Twilio does not retry a status callback: one refused during a database outage is lost, and the
-- final status is usually the last callback. A recovery pass asks Twilio for the status of
-- messages left unsettled; this is when it last asked about each (epoch ms), so a message is not
-- asked about on every pass.
ALTER TABLE sms_messages ADD COLUMN status_checked_at BIGINT;
-- The pass reads unsettled messages by their last change; this keeps it off settled rows. Not
-- built CONCURRENTLY: that waits for every transaction in the database, among them another
-- instance's wait for the migration lock, which PostgreSQL then breaks as a deadlock and fails a
-- start-up; the plain build holds off writes to sms_messages while it reads the table (seconds
-- for millions of rows).
CREATE INDEX sms_messages_unsettled ON sms_messages (updated_at)
    WHERE status IN ('accepted', 'scheduled', 'queued', 'sending', 'sent');
