-- Result objects the node made and their delivery to each destination
-- (issue 6): one outbox row per object x destination.

CREATE TABLE outputs (
    sop_instance_uid    TEXT PRIMARY KEY,
    case_id             TEXT NOT NULL,
    revision            BIGINT NOT NULL,
    kind                TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL DEFAULT '',
    path                TEXT NOT NULL,
    created_at          TEXT NOT NULL
);
CREATE INDEX outputs_case ON outputs (case_id);

CREATE TABLE outbox (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL,
    destination         TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            BIGINT NOT NULL DEFAULT 0,
    last_status         TEXT NOT NULL DEFAULT '',
    next_attempt_at     TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
