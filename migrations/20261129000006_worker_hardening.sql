-- Worker hardening: upload-quota admission that concurrent workers cannot race past.
-- Forward-only.

-- The duration a worker admitted against its owner's quota for this track: the declared
-- duration before decoding, then the decoded one before anything is stored. Admission
-- locks the owner's row, so admissions for one owner take turns, and each counts the
-- durations admitted before it (tracks still processing included). `duration_ms` takes over
-- once the track is ready.
ALTER TABLE tracks ADD COLUMN admitted_ms bigint CHECK (admitted_ms >= 0);
