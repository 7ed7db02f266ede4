-- An unfunded channel is found by the script its funding pays (schema 3 of
-- the SQLite store): the faucet and `fund` look it up by index, never by
-- walking every unfunded row (issue 14, item 2).
ALTER TABLE channels ADD COLUMN funding_script TEXT;
CREATE INDEX channels_funding_script ON channels (funding_script);
