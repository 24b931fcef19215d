//! The daemon's event loops.

pub mod core;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
