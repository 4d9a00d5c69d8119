-- Each actor's newest activity (PostgreSQL documents backend), kept by statement triggers in
-- the same transaction as the activities themselves, whichever code path writes or deletes
-- them. The feed's first step reads one row per followed account from this small table
-- instead of descending each followed account's index of `activity_documents`.
CREATE TABLE activity_heads (
    actor      uuid        PRIMARY KEY,
    created_at timestamptz NOT NULL,
    id         uuid        NOT NULL
);

INSERT INTO activity_heads (actor, created_at, id)
SELECT DISTINCT ON (actor) actor, created_at, id
FROM activity_documents
ORDER BY actor, created_at DESC, id DESC;

-- New activities: an actor's head moves to the newest of them if it is newer.
CREATE FUNCTION activity_heads_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO activity_heads AS h (actor, created_at, id)
    SELECT DISTINCT ON (actor) actor, created_at, id FROM added ORDER BY actor, created_at DESC, id DESC
    ON CONFLICT (actor) DO UPDATE SET created_at = EXCLUDED.created_at, id = EXCLUDED.id
        WHERE (EXCLUDED.created_at, EXCLUDED.id) > (h.created_at, h.id);
    RETURN NULL;
END $$;

CREATE TRIGGER activity_heads_after_insert AFTER INSERT ON activity_documents
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION activity_heads_after_insert();

-- Deleted activities: a head that was deleted moves to its actor's newest remaining activity,
-- or goes when none remains. The head row is matched by its id too, so a concurrent insert
-- that moved the head meanwhile is left alone.
CREATE FUNCTION activity_heads_after_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH moved AS (
        SELECT h.actor, h.id AS old_id, n.created_at, n.id
        FROM gone g
        JOIN activity_heads h ON h.actor = g.actor AND h.id = g.id
        LEFT JOIN LATERAL (
            SELECT a.created_at, a.id FROM activity_documents a
            WHERE a.actor = h.actor
            ORDER BY a.created_at DESC, a.id DESC
            LIMIT 1
        ) n ON true
    ),
    updated AS (
        UPDATE activity_heads h SET created_at = m.created_at, id = m.id
        FROM moved m
        WHERE h.actor = m.actor AND h.id = m.old_id AND m.id IS NOT NULL
    )
    DELETE FROM activity_heads h
    USING moved m
    WHERE h.actor = m.actor AND h.id = m.old_id AND m.id IS NULL;
    RETURN NULL;
END $$;

CREATE TRIGGER activity_heads_after_delete AFTER DELETE ON activity_documents
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION activity_heads_after_delete();
