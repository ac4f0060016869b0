-- Whether an ultrasound instance is Doppler / colour flow (header::us_doppler),
-- so that the case assembler applies the same lesion-side rule as imaging
-- (crate::side), which leaves such images out. Rows indexed before this
-- migration count as B-mode, as the assembler treated them until now.
ALTER TABLE instances ADD COLUMN us_doppler BOOLEAN NOT NULL DEFAULT FALSE;
