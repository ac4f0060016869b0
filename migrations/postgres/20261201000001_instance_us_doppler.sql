-- PostgreSQL dialect of ../20261201000001_instance_us_doppler.sql.
ALTER TABLE instances ADD COLUMN us_doppler BOOLEAN NOT NULL DEFAULT FALSE;
