-- PostgreSQL dialect of ../20261203001700_fetches.sql (the same text): query/retrieve (issue 17). `fetches`: one row per
-- case revision and trigger ("on_open", "before_run"), claimed with a lease
-- like a case run (`claimed_by`/`lease_until`) so that one node of several
-- does it; `sources` names the sources being queried (the cases view shows
-- "fetching from ..."). `fetch_attempts`: one row per source queried, what
-- it matched and what it delivered; also the minimum interval between
-- queries of one patient at one source. The same text is in postgres/.

CREATE TABLE fetches (
    id              TEXT PRIMARY KEY,
    case_id         TEXT NOT NULL,
    revision        BIGINT NOT NULL,
    trigger_name    TEXT NOT NULL,
    state           TEXT NOT NULL,
    sources         TEXT NOT NULL DEFAULT '',
    outcome         TEXT NOT NULL DEFAULT '',
    claimed_by      TEXT NOT NULL DEFAULT '',
    lease_until     TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (case_id, revision, trigger_name)
);
CREATE INDEX fetches_state ON fetches (state);
CREATE INDEX fetches_case ON fetches (case_id);

CREATE TABLE fetch_attempts (
    fetch_id            TEXT NOT NULL,
    case_id             TEXT NOT NULL,
    patient_key         TEXT NOT NULL,
    source              TEXT NOT NULL,
    started_at          TEXT NOT NULL,
    finished_at         TEXT NOT NULL,
    status              TEXT NOT NULL,
    matches             BIGINT NOT NULL DEFAULT 0,
    series_requested    BIGINT NOT NULL DEFAULT 0,
    instances_received  BIGINT NOT NULL DEFAULT 0,
    detail              TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (fetch_id, source)
);
CREATE INDEX fetch_attempts_patient ON fetch_attempts (patient_key, source);
