//! `tidings chat`: a terminal messenger on the client library (ratatui on
//! crossterm).
//!
//! - [`app`]: the screen's state and what each key does (pure);
//! - [`ui`]: drawing it (pure, tested on ratatui's `TestBackend`);
//! - [`run`]: the terminal and the client thread behind it.

pub mod app;
pub mod run;
pub mod ui;

pub use run::run;

#[cfg(test)]
mod tests;
