//! Every Lua example of the manual (docs/**/*.md and README.md) runs, and prints what
//! its page says. The `file=` blocks are files for the pages' configurations: the
//! runtime's `docs_examples` test runs those.

#[tokio::test]
async fn every_lua_example_of_the_manual_runs_as_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut failures = Vec::new();
    let mut count = 0;
    let mut on_lua_api = 0;
    for path in queue_lua::examples::pages(&root) {
        let page = std::fs::read_to_string(&path).expect("a page");
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let examples = match queue_lua::examples::extract(&page) {
            Ok(examples) => examples,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        for example in &examples {
            count += 1;
            if name.ends_with("lua-api.md") {
                on_lua_api += 1;
            }
            if let Err(e) = queue_lua::examples::run(example).await {
                failures.push(format!(
                    "{name}:{}: {e}\n--- code ---\n{}",
                    example.line, example.code
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} Lua examples failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // A scanner that silently found nothing would pass the loop above.
    assert!(
        on_lua_api >= 10,
        "found only {on_lua_api} examples on lua-api.md"
    );
}
