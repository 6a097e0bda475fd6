-- Whether a done job's picture was handed to the Discord layer. A bot that stops between
-- marking a job done and posting its picture posts it at its next start.
ALTER TABLE jobs ADD COLUMN delivered_at REAL;
-- The job's message id when it was marked done. Posting the picture changes message_id,
-- so an unchanged one after a crash means the picture was not posted.
ALTER TABLE jobs ADD COLUMN done_message_id INTEGER;
-- Pictures finished before this migration count as posted.
UPDATE jobs SET delivered_at = finished_at WHERE state = 'done';
