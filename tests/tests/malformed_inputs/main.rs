//! Malformed-input cases, table-driven, one family per module: SPA datagrams, the gateway
//! TOML config, controller CLI arguments (real binary), sync requests over the real Unix
//! socket of a running `postern-controller serve`, and captured IP packets. Each case must
//! end in a silent drop (a stable reason code, nothing opened) or ONE clear error line,
//! never a panic. `case_counts` prints how many cases each family has.
//!
//! Owns: these tables and their checks. Must not touch: network namespaces, nftables or
//! anything outside the temp directories the tests create (the CLI and sync families run
//! the controller binary on a temp SQLite file and a temp Unix socket).

mod capture;
mod cli;
mod config;
mod spa;
mod sync;

/// Every family's case count; the issue asks for at least 200 in total.
#[test]
fn case_counts() {
    let families = [
        ("spa datagrams", spa::cases().len()),
        ("gateway config", config::cases().len()),
        ("controller cli", cli::cases().len()),
        ("sync requests", sync::cases().len()),
        ("captured packets", capture::cases().len()),
    ];
    let mut total = 0;
    for (family, n) in families {
        println!("malformed-input cases: {family:<17} {n:>4}");
        assert!(n >= 20, "family {family} has only {n} cases");
        total += n;
    }
    println!("malformed-input cases: {:<17} {total:>4}", "total");
    assert!(total >= 200, "only {total} malformed-input cases");
}

/// Asserts `text` is one clear error line: non-empty, no line break, not a panic message.
pub fn assert_one_line(case: &str, text: &str) {
    let t = text.strip_suffix('\n').unwrap_or(text);
    assert!(!t.trim().is_empty(), "{case}: empty error message");
    assert!(
        !t.contains('\n'),
        "{case}: error spans several lines: {text:?}"
    );
    assert!(
        !t.contains("panicked") && !t.contains("RUST_BACKTRACE"),
        "{case}: a panic, not an error: {text:?}"
    );
}
