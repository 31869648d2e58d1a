"""Audio: MusicGen synthesis (`audio generate`, with the static-cache decoder), FLAC shards, `audio verify`."""
