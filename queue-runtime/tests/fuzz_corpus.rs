//! Replays the committed `config_load` fuzz corpus: loading never panics, and every
//! error names the file.

#[test]
fn the_config_corpus_loads_or_fails_with_located_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config_load");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Err(errors) =
            queue_runtime::config::parse_text(std::path::Path::new("fuzz.yaml"), text)
        {
            for e in errors.0 {
                assert!(
                    e.to_string().starts_with("fuzz.yaml"),
                    "{}: {e}",
                    path.display()
                );
            }
        }
        replayed += 1;
    }
    assert!(replayed >= 3, "corpus has {replayed} inputs");
}

#[path = "../../fuzz/outside_message.rs"]
mod outside_message;

/// Replays the committed `outside_message` corpus: every message another client might
/// send is handled, fails, and moves to its retry or dead-letter queue as a copy any
/// driver accepts.
#[tokio::test]
async fn the_outside_message_corpus_always_moves_its_failures() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/outside_message");
    let world = outside_message::World::new().await;
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        world.run(outside_message::case(&data)).await;
        replayed += 1;
    }
    assert!(replayed >= 2, "corpus has {replayed} inputs");
}
