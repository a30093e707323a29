//! The AMQP 1.0 driver's guard on any message, split anyhow: see `../amqp10_guard.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../queue-amqp10/src/guard.rs"]
#[allow(dead_code)]
mod guard;

#[path = "../../queue-amqp10/src/raw_value.rs"]
#[allow(dead_code)]
mod raw_value;

#[path = "../amqp10_guard.rs"]
mod amqp10_guard;

fuzz_target!(|data: &[u8]| amqp10_guard::check(data));
