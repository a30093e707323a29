//! Replays the committed `codec_decode` fuzz corpus: decoding never panics, and a
//! failure is always INVALID.

use queue_core::{Codec, ErrorKind};

#[test]
fn the_codec_corpus_decodes_or_fails_invalid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/codec_decode");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        for codec in [Codec::Json, Codec::MsgPack] {
            match codec.decode(&bytes) {
                Ok(value) if codec == Codec::MsgPack => {
                    codec
                        .encode(&value)
                        .expect("a decoded msgpack value re-encodes");
                }
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::Invalid),
            }
        }
        replayed += 1;
    }
    assert!(replayed >= 4, "corpus has {replayed} inputs");
}
