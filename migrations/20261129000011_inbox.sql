-- The document store's PostgreSQL backend, continued (shared/src/documents/inbox.rs): direct
-- messages, each member's summary of a conversation, and notifications with a read marker
-- per account. As with comments and activities, no foreign keys: the MongoDB backend cannot
-- have them, and whoever deletes an account deletes its documents through the seam.

CREATE TABLE message_documents (
    id              uuid        PRIMARY KEY,
    conversation_id uuid        NOT NULL,
    sender          uuid        NOT NULL,
    recipient       uuid        NOT NULL,
    -- The sender's idempotency key: a retried send finds the first.
    client_id       text        NOT NULL CHECK (char_length(client_id) BETWEEN 1 AND 64),
    created_at      timestamptz NOT NULL,
    -- {"body": "…"}
    doc             jsonb       NOT NULL,
    UNIQUE (sender, client_id)
);
-- A conversation newest first; a member's unread messages after its marker.
CREATE INDEX message_documents_conversation ON message_documents (conversation_id, id DESC);
CREATE INDEX message_documents_unread ON message_documents (conversation_id, recipient, id);
CREATE INDEX message_documents_recipient ON message_documents (recipient);

-- One row per member of a conversation: its last message and how far the member has read.
CREATE TABLE conversation_documents (
    conversation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    other_id        uuid NOT NULL,
    last_message_id uuid NOT NULL,
    read_up_to      uuid,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX conversation_documents_user ON conversation_documents (user_id, last_message_id DESC);
CREATE INDEX conversation_documents_other ON conversation_documents (other_id);

CREATE TABLE notification_documents (
    id         uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN
                   ('follow', 'like', 'repost', 'comment', 'reply', 'track_ready', 'track_failed', 'message')),
    actor      uuid,
    created_at timestamptz NOT NULL,
    -- {"subject": {"kind": "track", "id": "…"}}
    doc        jsonb       NOT NULL
);
CREATE INDEX notification_documents_user ON notification_documents (user_id, id DESC);
CREATE INDEX notification_documents_actor ON notification_documents (actor) WHERE actor IS NOT NULL;

-- Everything up to `up_to` is read.
CREATE TABLE notification_reads (
    user_id uuid PRIMARY KEY,
    up_to   uuid NOT NULL
);
