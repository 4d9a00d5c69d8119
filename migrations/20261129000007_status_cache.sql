-- Status notifications also carry who owns a track and who may see it, and fire when either
-- changes: each API process keeps the status of the tracks it is asked about in a cache fed by
-- these notifications, and answers status polls from it, access check included, without a
-- database round trip.
CREATE OR REPLACE FUNCTION waveline_track_status_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('waveline_track_status', json_build_object('id', OLD.id, 'deleted', true)::text);
    ELSIF TG_OP = 'INSERT'
          OR NEW.state IS DISTINCT FROM OLD.state
          OR NEW.stage IS DISTINCT FROM OLD.stage
          OR NEW.progress IS DISTINCT FROM OLD.progress
          OR NEW.revision IS DISTINCT FROM OLD.revision
          OR NEW.attempts IS DISTINCT FROM OLD.attempts
          OR NEW.error_code IS DISTINCT FROM OLD.error_code
          OR NEW.error_message IS DISTINCT FROM OLD.error_message
          OR NEW.owner_id IS DISTINCT FROM OLD.owner_id
          OR NEW.visibility IS DISTINCT FROM OLD.visibility THEN
        PERFORM pg_notify('waveline_track_status', json_build_object(
            'id', NEW.id, 'state', NEW.state, 'stage', NEW.stage, 'progress', NEW.progress,
            'attempts', NEW.attempts, 'revision', NEW.revision, 'error_code', NEW.error_code,
            'error_message', left(NEW.error_message, 2000),
            'owner_id', NEW.owner_id, 'visibility', NEW.visibility)::text);
    END IF;
    RETURN NULL;
END
$$;
