//! Every Lua example of docs/lua-api.md runs, and prints what the page says.

#[tokio::test]
async fn the_lua_api_page_examples_run_as_documented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/lua-api.md");
    let page = std::fs::read_to_string(&path).expect("docs/lua-api.md");
    let examples = queue_lua::examples::extract(&page);
    assert!(
        examples.len() >= 10,
        "found only {} examples",
        examples.len()
    );
    for example in &examples {
        if let Err(e) = queue_lua::examples::run(example).await {
            panic!("docs/lua-api.md: {e}\n--- code ---\n{}", example.code);
        }
    }
}
