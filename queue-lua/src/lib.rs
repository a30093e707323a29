//! The Lua queue module (queue, errors, logger) on mlua
#![warn(missing_docs)]
