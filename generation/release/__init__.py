"""The release: `build` (Parquet shards and the card), concept sets (`concepts export`), `push` to the Hub."""
