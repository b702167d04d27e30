//! `sovereign perplexity`: a model's perplexity on a text file, computed as
//! llama.cpp's `llama-perplexity` computes it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sovereign_inference::Engine;

/// Perplexity arguments.
#[derive(Args)]
pub struct PerplexityArgs {
    /// The model store directory.
    #[arg(long)]
    store: PathBuf,
    /// The model name (its newest version is used).
    #[arg(long)]
    model: String,
    /// Tokens per chunk (the second half of each chunk is scored).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (default: every whole chunk of the text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The text file (UTF-8).
    file: PathBuf,
}

/// Prints the running perplexity after each chunk, then `perplexity: X` last.
pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(args.chunks != Some(0), "--chunks must be at least 1");
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    // Read by candle's thread pool (which the kernels share) on first use.
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    let model = sovereign_store::live_model(&args.store, &args.model)?;
    let engine = Engine::load(&Engine::locate(&model.dir, &model.files)?)?;
    let result = engine.perplexity(&text, args.ctx, args.chunks, &mut |chunk, ppl| {
        println!("chunk {}: {ppl:.4}", chunk + 1);
    })?;
    println!(
        "scored {} tokens in {} chunks of {}; top-1 agreement with the text {:.2}%",
        result.scored,
        result.chunks,
        args.ctx,
        100.0 * result.top1 as f64 / result.scored as f64
    );
    println!("perplexity: {:.4}", result.perplexity);
    Ok(())
}
