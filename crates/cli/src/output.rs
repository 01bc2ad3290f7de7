//! Writing results: human text or one JSON document per command on stdout, a live line that
//! rewrites itself on a terminal, and errors on stderr (plus a JSON error document with `--json`).

use std::io::{self, IsTerminal, Write};

use crate::error::CliError;

/// Where and how a command prints.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Printer {
    json: bool,
    terminal: bool,
}

impl Printer {
    /// A printer to stdout; `json` selects machine-readable output.
    pub(crate) fn new(json: bool) -> Self {
        Self {
            json,
            terminal: io::stdout().is_terminal(),
        }
    }

    /// True with `--json`.
    pub(crate) fn json(self) -> bool {
        self.json
    }

    /// True when stdout is a terminal and output is human text.
    pub(crate) fn live(self) -> bool {
        self.terminal && !self.json
    }

    /// Prints one line of text.
    pub(crate) fn line(self, text: &str) -> Result<(), CliError> {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{text}")?;
        stdout.flush()?;
        Ok(())
    }

    /// Prints a JSON document on one line.
    pub(crate) fn document(self, value: &serde_json::Value) -> Result<(), CliError> {
        self.line(&value.to_string())
    }

    /// Reports a problem found by a command that otherwise succeeded in printing its result
    /// (`error: …` on stderr), before it exits with code 1.
    pub(crate) fn problem(self, text: &str) {
        let _ = writeln!(io::stderr().lock(), "error: {text}");
    }

    /// Rewrites the current terminal line with `text` (carriage return, clear to end of line).
    pub(crate) fn rewrite(self, text: &str) -> Result<(), CliError> {
        let mut stdout = io::stdout().lock();
        write!(stdout, "\r{text}\x1b[K")?;
        stdout.flush()?;
        Ok(())
    }
}

/// Reports `error`: `error: …` on stderr, with the chain of causes, and with `json` also a
/// `{"error": {"code", "message"}}` document on stdout. A closed stdout is not reported.
pub fn report_error(error: &CliError, json: bool) {
    if error.is_broken_pipe() {
        return;
    }
    let mut message = format!("error: {error}");
    let mut source = std::error::Error::source(error);
    let mut causes = Vec::new();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) && !causes.contains(&text) {
            causes.push(text);
        }
        source = cause.source();
    }
    if !causes.is_empty() {
        message.push_str(&format!("\n  caused by: {}", causes.join(": ")));
    }
    let _ = writeln!(io::stderr().lock(), "{message}");
    if json {
        let document = serde_json::json!({
            "error": { "code": error.code(), "message": error.message() }
        });
        let _ = writeln!(io::stdout().lock(), "{document}");
    }
}

/// Right-aligns `text` in `width` columns.
pub(crate) fn pad_left(text: &str, width: usize) -> String {
    format!("{text:>width$}")
}
