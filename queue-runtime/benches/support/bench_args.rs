//! What a bench's command line asks of a pass measured in turns.

/// Whether to run a pass measured in turns: under `cargo bench` (not `cargo test
/// --benches`, which passes no `--bench` and only checks that a bench runs), not
/// while criterion profiles, lists or runs only ignored benchmarks, and not when a
/// filter names other benchmarks (`-- in_turns` asks for the passes alone).
pub fn in_turns_wanted(args: &[String]) -> bool {
    const NO_PASS: [&str; 4] = ["--profile-time", "--list", "--test", "--ignored"];
    let is = |arg: &str, option: &str| arg == option || arg.starts_with(&format!("{option}="));
    if !args.iter().any(|a| a == "--bench")
        || args
            .iter()
            .any(|a| NO_PASS.iter().any(|option| is(a, option)))
    {
        return false;
    }
    // Criterion's options that take the next word as their value (`--sample-size
    // 10`); any other word that is not an option is a filter.
    const TAKE_A_VALUE: [&str; 16] = [
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
        "--output-format",
        "--format",
        "--color",
        "--plotting-backend",
        "--logfile",
    ];
    let is_value = |i: usize| i > 0 && TAKE_A_VALUE.contains(&args[i - 1].as_str());
    args.iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with('-') && !is_value(*i))
        .all(|(_, filter)| filter.contains("in_turns"))
}
