-- Patient cases across modalities (issue 5), and the instance attributes the
-- completeness rules read.

ALTER TABLE instances ADD COLUMN patient_id_key TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN laterality TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN view TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN series_description TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN image_type TEXT NOT NULL DEFAULT '';

CREATE TABLE cases (
    id                  TEXT PRIMARY KEY,
    patient_key         TEXT NOT NULL,
    state               TEXT NOT NULL,
    revision            BIGINT NOT NULL DEFAULT 0,
    reason              TEXT NOT NULL DEFAULT '',
    opened_at           TEXT NOT NULL,
    first_instance_at   TEXT NOT NULL,
    last_instance_at    TEXT NOT NULL,
    oldest_study_date   TEXT NOT NULL DEFAULT '',
    newest_study_date   TEXT NOT NULL DEFAULT '',
    inputs_digest       TEXT NOT NULL DEFAULT '',
    updated_at          TEXT NOT NULL
);
CREATE INDEX cases_patient ON cases (patient_key);
CREATE INDEX cases_state ON cases (state);

CREATE TABLE case_instances (
    case_id             TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    added_at            TEXT NOT NULL,
    PRIMARY KEY (case_id, sop_instance_uid)
);

CREATE TABLE case_transitions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id     TEXT NOT NULL,
    time        TEXT NOT NULL,
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX case_transitions_case ON case_transitions (case_id);

ALTER TABLE events ADD COLUMN case_id TEXT;
CREATE INDEX events_case ON events (case_id);
