//! A `BTreeMap`-backed [`super::StoreApi`] for the hub's unit tests.
