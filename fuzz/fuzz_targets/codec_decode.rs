//! Decoding arbitrary bytes with either codec never panics; what decodes re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use queue_core::Codec;

fuzz_target!(|data: &[u8]| {
    for codec in [Codec::Json, Codec::MsgPack] {
        if let Ok(value) = codec.decode(data) {
            // msgpack carries everything it decodes; json refuses only what it cannot carry.
            if codec == Codec::MsgPack {
                codec.encode(&value).expect("a decoded msgpack value re-encodes");
            }
        }
    }
});
