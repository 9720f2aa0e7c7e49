"""The data stage (kind "data"): a `tasks:` or `corpus:` source -> Parquet shards in the store."""
