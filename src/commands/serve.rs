//! `sovereign serve`: the OpenAI-compatible API for one node.

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(args: sovereign_api::ServeArgs) -> anyhow::Result<()> {
    sovereign_api::run(&args)?;
    Ok(())
}
