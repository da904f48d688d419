//! Unit tests: configuration, the snapshot rules, the cache and the backoff.
