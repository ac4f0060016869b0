-- The audit log and the instance index (issue 2). Portable SQL except for
-- AUTOINCREMENT, which keeps event order strictly increasing in SQLite.

CREATE TABLE associations (
    id          TEXT PRIMARY KEY,
    calling_ae  TEXT NOT NULL,
    called_ae   TEXT NOT NULL,
    peer        TEXT NOT NULL,
    opened_at   TEXT NOT NULL,
    closed_at   TEXT,
    outcome     TEXT,
    stored      BIGINT NOT NULL DEFAULT 0,
    failed      BIGINT NOT NULL DEFAULT 0,
    bytes       BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_key         TEXT NOT NULL,
    modality            TEXT NOT NULL,
    study_date          TEXT NOT NULL,
    transfer_syntax     TEXT NOT NULL,
    size_bytes          BIGINT NOT NULL,
    path                TEXT NOT NULL,
    received_at         TEXT NOT NULL,
    association_id      TEXT,
    calling_ae          TEXT NOT NULL
);
CREATE INDEX instances_patient ON instances (patient_key);
CREATE INDEX instances_study ON instances (study_instance_uid);

CREATE TABLE events (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    time                TEXT NOT NULL,
    event               TEXT NOT NULL,
    association_id      TEXT,
    sop_instance_uid    TEXT,
    study_instance_uid  TEXT,
    patient_key         TEXT,
    status              INTEGER,
    detail              TEXT
);
CREATE INDEX events_event ON events (event);
