//! `hitctl token new` and `hitctl token hash`: a new bearer token and the tokens-file entry that
//! holds its SHA-256, or the hash of an existing token. The token is printed once and stored
//! nowhere.

use std::io::BufRead;

use hitcounter_auth::token::{self, EntrySpec};
use serde_json::json;

use crate::{
    cli::{TokenCommand, TokenNewArgs},
    error::CliError,
    output::Printer,
    Outcome,
};

/// Runs a `hitctl token` subcommand.
pub(crate) fn run(command: TokenCommand, out: Printer) -> Result<Outcome, CliError> {
    match command {
        TokenCommand::New(args) => new(args, out),
        TokenCommand::Hash => hash(out),
    }
}

fn new(args: TokenNewArgs, out: Printer) -> Result<Outcome, CliError> {
    let spec = EntrySpec {
        name: args.name,
        roles: args.roles,
        prefixes: args.prefixes,
        hits: args.hits_per_second.map(|rate| (rate, args.hits_burst)),
        requests: args
            .requests_per_second
            .map(|rate| (rate, args.requests_burst)),
        max_watches: args.max_watches,
    };
    let token = token::generate();
    let hash = token::hash(&token);
    let entry = token::toml_entry(&spec, &hash);
    // The services will read this entry: check it the way they will, before printing anything.
    hitcounter_auth::file::parse("(new entry)", &entry)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if out.json() {
        out.document(&json!({
            "name": spec.name,
            "token": token,
            "sha256": token::to_hex(&hash),
            "entry": entry,
        }))?;
    } else {
        out.line("token (shown only now; give it to the client, e.g. as HITCOUNTER_TOKEN):")?;
        out.line(&token)?;
        out.line("")?;
        out.line("tokens-file entry (it holds only the token's SHA-256):")?;
        for line in entry.lines() {
            out.line(line)?;
        }
    }
    Ok(Outcome::Success)
}

fn hash(out: Printer) -> Result<Outcome, CliError> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let token = line.trim();
    if token.is_empty() {
        return Err(CliError::Usage(
            "give the token on standard input, e.g. `printenv HITCOUNTER_TOKEN | hitctl token hash`"
                .into(),
        ));
    }
    let hex = token::to_hex(&token::hash(token));
    if out.json() {
        out.document(&json!({ "sha256": hex }))?;
    } else {
        out.line(&hex)?;
    }
    Ok(Outcome::Success)
}
