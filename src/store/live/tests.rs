//! Unit tests of the in-memory queues.
