-- The job queue, per-guild settings and a key/value table for counters.
-- Times are Unix timestamps in seconds (UTC). Discord ids are 64-bit integers.

CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id        INTEGER,                -- NULL for jobs requested in direct messages
    channel_id      INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    prompt          TEXT    NOT NULL,       -- the prompt as the user typed it
    request         TEXT    NOT NULL,       -- GenerationRequest.to_dict() as JSON
    state           TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    -- Fair-queue virtual time: each user's n-th waiting job gets a round n higher than
    -- the round being served, so users take turns.
    round           INTEGER NOT NULL,
    -- Jobs interrupted by a crash or a shutdown go back to the queue with priority 1.
    priority        INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,   -- times the job was interrupted
    saved_iteration INTEGER,                -- iteration of the last saved resumable state
    state_path      TEXT,                   -- file holding that state
    created_at      REAL    NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    message_id      INTEGER,
    error           TEXT,                   -- user-facing reason of a failure
    result_path     TEXT
);

-- The dequeue query: ORDER BY priority DESC, round, id over queued jobs.
CREATE INDEX jobs_queue_order ON jobs (priority DESC, round, id) WHERE state = 'queued';

-- Per-user limits and "my jobs" lookups over queued and running jobs.
CREATE INDEX jobs_user_active ON jobs (user_id, guild_id) WHERE state IN ('queued', 'running');

-- Recovery at start-up looks for running jobs.
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE guild_settings (
    guild_id INTEGER NOT NULL,
    key      TEXT    NOT NULL,
    value    TEXT    NOT NULL,              -- JSON
    PRIMARY KEY (guild_id, key)
) WITHOUT ROWID;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                     -- JSON
) WITHOUT ROWID;
