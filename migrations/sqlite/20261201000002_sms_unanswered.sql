-- Messages reserved whose Twilio answer was never recorded (`accepted`) are swept to `unknown`
-- after a crash or a database outage; this keeps that sweep off the whole table.
CREATE INDEX sms_messages_accepted ON sms_messages (created_at) WHERE status = 'accepted';
