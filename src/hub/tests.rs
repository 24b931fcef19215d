//! Unit tests of the hub against the test store.
