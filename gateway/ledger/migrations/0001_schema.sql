-- Paystream's channel ledger on PostgreSQL, version 1: the tables of the
-- SQLite store (gateway/ledger/store.py, schema 2) with PostgreSQL's types,
-- plus what several gateway hosts need to share them: the holder and epoch of
-- each channel (the fence), the hosts' leases, and a sequence for channel ids.

CREATE TABLE channels (
    id BIGINT PRIMARY KEY,          -- also the BIP32 child index of the channel's K2
    channel_id TEXT UNIQUE,         -- "txid:vout" once funded
    kind TEXT NOT NULL,
    client_pubkey TEXT,
    server_pubkey TEXT,
    expiry BIGINT,
    change_script TEXT,
    network TEXT,
    state TEXT NOT NULL,
    value BIGINT,
    refund_tx TEXT,
    refund_value BIGINT,
    refund_outpoint TEXT,
    seq BIGINT,
    balance BIGINT,
    sig TEXT,
    bill BIGINT,
    created_at DOUBLE PRECISION,
    funded_at DOUBLE PRECISION,
    disconnected_at DOUBLE PRECISION,
    client_addr TEXT,
    exit_fee BIGINT,
    closing_at DOUBLE PRECISION,
    settle_txid TEXT,
    settle_tx TEXT,
    settle_fee BIGINT,
    settled_at DOUBLE PRECISION,
    confirmed_height BIGINT,
    closed_at DOUBLE PRECISION,
    -- The gateway host holding the channel, and the epoch of that holding:
    -- every write of a holder checks it (paystream_fence), every change of
    -- holder raises it.
    holder TEXT,
    epoch BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX channels_state ON channels (state);
CREATE INDEX channels_holder ON channels (holder);

CREATE TABLE deliveries (
    channel BIGINT NOT NULL,
    media TEXT NOT NULL,
    publisher TEXT,
    delivered_ms BIGINT,
    bill BIGINT,
    PRIMARY KEY (channel, media)
);

CREATE TABLE settlements (
    txid TEXT PRIMARY KEY,
    tx TEXT,
    fee BIGINT,
    vsize BIGINT,
    reserves BIGINT,
    channels BIGINT,
    state TEXT,
    created_at DOUBLE PRECISION,
    confirmed_height BIGINT
);
CREATE INDEX settlements_state ON settlements (state);

CREATE TABLE payouts (
    txid TEXT NOT NULL,
    publisher TEXT,
    script TEXT NOT NULL,
    amount BIGINT,
    PRIMARY KEY (txid, script)
);

CREATE TABLE earnings (
    txid TEXT NOT NULL,
    channel BIGINT NOT NULL,
    media TEXT NOT NULL,
    gross BIGINT,
    fee BIGINT,
    PRIMARY KEY (txid, channel, media)
);

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);

-- One row per gateway host: its lease (renewed by the host, in the
-- database's clock) and where its operator API answers.
CREATE TABLE hosts (
    host TEXT PRIMARY KEY,
    url TEXT,
    alive_until DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);

-- Channel ids (= K2 indexes): never the same twice, whichever host asks.
CREATE SEQUENCE channel_ids START 1;

-- The fence: a holder's write goes on only if it still holds the channel
-- at the epoch it knows. The row is locked until the writer's commit, so a
-- take-over (which raises the epoch) waits for that write, and a write that
-- comes after a take-over fails here, whole.
CREATE FUNCTION paystream_fence(row_id BIGINT, held_epoch BIGINT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM channels WHERE id = row_id AND epoch = held_epoch FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'channel % was taken over (epoch % is stale)', row_id, held_epoch
            USING ERRCODE = 'PSF01';
    END IF;
END;
$$;
