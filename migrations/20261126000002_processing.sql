-- The worker fleet: what processing records on a track, the renditions of each revision, and
-- the outbox that makes "enqueue after commit" durable.

ALTER TABLE tracks
    ADD COLUMN source       jsonb,   -- {container, codec, sample_rate, channels, bits_per_sample, duration_ms}
    ADD COLUMN loudness     jsonb,   -- {integrated_lufs, range_lu, true_peak_dbtp, sample_peak_dbfs, replaygain_track_gain_db}
    ADD COLUMN track_tags   jsonb,   -- {title, artist, album, genre, year, track}
    ADD COLUMN waveform_key         text,
    ADD COLUMN waveform_dat_key     text,
    ADD COLUMN waveform_summary_key text,
    ADD COLUMN artwork_key          text,
    -- The revision whose renditions are live; NULL until the first one is ready. Reprocessing
    -- works on `revision` while this keeps pointing at the old set.
    ADD COLUMN ready_revision integer,
    ADD COLUMN enqueued_at timestamptz,
    -- When the current claim was taken: with enqueued_at, the queueing delay.
    ADD COLUMN claimed_at timestamptz;

CREATE TABLE renditions (
    track_id      uuid NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    revision      integer NOT NULL,
    preset        text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('progressive', 'hls')),
    -- The file, or the HLS master playlist.
    storage_key   text NOT NULL,
    -- Every object of the preset (HLS: playlists, init and media segments).
    storage_keys  text[] NOT NULL,
    codec         text NOT NULL,
    bitrate_kbps  integer NOT NULL,
    sample_rate   integer NOT NULL,
    channels      smallint NOT NULL,
    duration_ms   bigint NOT NULL,
    bytes         bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (track_id, revision, preset)
);

-- Messages to publish, written in the same transaction as the state change that needs them;
-- the relay publishes with confirms and stamps `sent_at`.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
