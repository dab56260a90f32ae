//! Argument errors of the `postern`, `postern-gateway` and `postern-controller` binaries.
//!
//! Owns the rule that a bad command-line argument gets ONE error line naming the argument
//! and pointing at `--help` (clap's own rendering spans several lines with a usage block),
//! and that such errors exit with status 2. Must not know any binary's commands.

use clap::error::ErrorKind;
use clap::Parser;

/// Exit status for a usage or validation error.
pub const USAGE_EXIT: u8 = 2;

/// Parses the process arguments; prints help and version as clap does, and any other
/// parse error as one line on stderr, then exits with status 2.
pub fn parse_args<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                eprintln!("{}", one_line(&e));
                std::process::exit(i32::from(USAGE_EXIT));
            }
        },
    }
}

/// clap's error without the usage block and tips, on one line.
pub fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() && !line.starts_with("tip:") {
            parts.push(line);
        }
    }
    let mut msg = parts.join(" ");
    if !msg.starts_with("error:") {
        msg.insert_str(0, "error: ");
    }
    msg.push_str(" (run with --help for usage and examples)");
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(long)]
        port: u16,
    }

    #[test]
    fn errors_are_one_line_and_name_the_argument() {
        for args in [
            vec!["demo", "--port", "70000"],
            vec!["demo"],
            vec!["demo", "--port", "1", "--colour"],
        ] {
            let e = Demo::try_parse_from(&args).expect_err("invalid arguments");
            let line = one_line(&e);
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with("error: "), "{line}");
        }
        let e = Demo::try_parse_from(["demo", "--port", "x"]).expect_err("not a number");
        assert!(one_line(&e).contains("--port"), "{}", one_line(&e));
    }
}
