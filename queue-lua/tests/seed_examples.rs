//! Every Lua example of the seed document runs as written.

use queue_lua::examples::{self, Mode};

const SEED: &str = include_str!("seed-lua-queue-module.md");

#[tokio::test]
async fn every_lua_block_of_the_seed_runs() {
    let found = examples::extract(SEED).expect("the seed parses");
    assert_eq!(found.len(), 5, "the seed has five Lua blocks");
    for example in &found {
        examples::run(example)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", example.code));
    }
}

#[tokio::test]
async fn the_seeds_consumer_pattern_handles_a_message_and_fails_on_a_bounce() {
    let mut pattern = examples::extract(SEED)
        .expect("the seed parses")
        .into_iter()
        .find(|e| e.code.contains("function handle_email"))
        .expect("the seed's consumer pattern");
    pattern.mode = Mode::Handler("handle_email".into());
    examples::run(&pattern).await.unwrap();

    // The same handler, with the email double failing: the message is nacked.
    pattern.code = pattern.code.replace("payload.to", "\"bounce@example.com\"");
    pattern.expect_nack = true;
    examples::run(&pattern).await.unwrap();
}
