//! The copy of the seed document the tests run matches the user's own, when that is
//! beside the checkout (a developer's machine); elsewhere the test shows as ignored,
//! with the reason, never as a pass.

use queue_testkit::Trial;

const SEED: &str = include_str!("seed-lua-queue-module.md");
const NAME: &str = "the_seed_copy_matches_the_users_document";

fn main() {
    let original = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/seed/lua-queue-module.md");
    let trial = match std::fs::read_to_string(&original) {
        Ok(text) => Trial::test(NAME, move || {
            if text == SEED {
                Ok(())
            } else {
                Err(
                    "the seed changed: copy it to queue-lua/tests/ again and rerun the tests"
                        .into(),
                )
            }
        }),
        Err(e) => Trial::test(NAME, || Ok(()))
            .with_ignored_flag(true)
            .with_kind(format!("skipped: {} ({e})", original.display())),
    };
    queue_testkit::run(vec![trial]);
}
