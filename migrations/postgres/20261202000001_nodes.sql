-- Several nodes on one database (issue 14): the node that wrote each audit
-- event, and the leases with which a node claims work. A case or delivery
-- is claimed by `claimed_by` until `lease_until` (stored time format); an
-- expired lease may be taken by any node. `leases` holds the named
-- cluster-wide roles (the case assembler). The same text is in postgres/.

ALTER TABLE events ADD COLUMN node TEXT;
CREATE INDEX events_node ON events (node);

ALTER TABLE cases ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE cases ADD COLUMN lease_until TEXT NOT NULL DEFAULT '';

ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN lease_until TEXT NOT NULL DEFAULT '';

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
