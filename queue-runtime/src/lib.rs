//! The queue consumer host.
#![warn(missing_docs)]

pub mod config;
