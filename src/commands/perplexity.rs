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
    /// Tokens per chunk (the second half of each chunk is scored; default
    /// 512, or the reference's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Score at most this many chunks (default: every whole chunk of the text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Compare every scored position with a reference run: the logits file
    /// of `llama-perplexity --kl-divergence-base FILE` (which holds its own
    /// tokens and chunk size, so no text file is given). Prints how often
    /// both rank the same token first and the mean KL divergence.
    #[arg(long, value_name = "FILE", conflicts_with = "file")]
    reference: Option<PathBuf>,
    /// The text file (UTF-8).
    #[arg(required_unless_present = "reference")]
    file: Option<PathBuf>,
}

/// Prints the running perplexity after each chunk, then `perplexity: X` last.
pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(args.chunks != Some(0), "--chunks must be at least 1");
    // Read by candle's thread pool (which the kernels share) on first use.
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    let mut reference = match &args.reference {
        Some(path) => Some(sovereign_inference::Reference::open(path)?),
        None => None,
    };
    let ctx = match (&reference, args.ctx) {
        (Some(r), Some(ctx)) if ctx != r.ctx() => anyhow::bail!(
            "--ctx {ctx} differs from the reference's chunks of {} tokens",
            r.ctx()
        ),
        (Some(r), _) => r.ctx(),
        (None, ctx) => ctx.unwrap_or(512),
    };
    let model = sovereign_store::live_model(&args.store, &args.model)?;
    let engine = Engine::load(&Engine::locate(&model.dir, &model.files)?)?;
    let mut progress = |chunk: usize, ppl: f64| println!("chunk {}: {ppl:.4}", chunk + 1);
    let result = match (&mut reference, &args.file) {
        (Some(reference), _) => engine.perplexity_against(reference, args.chunks, &mut progress)?,
        (None, Some(file)) => {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
            engine.perplexity(&text, ctx, args.chunks, &mut progress)?
        }
        (None, None) => anyhow::bail!("give a text file or --reference"),
    };
    println!(
        "scored {} tokens in {} chunks of {ctx}; top-1 agreement with the text {:.2}%",
        result.scored,
        result.chunks,
        100.0 * result.top1 as f64 / result.scored as f64
    );
    if let Some(agreement) = &result.agreement {
        println!(
            "same top-1 as the reference: {:.2}% ({} of {})",
            100.0 * agreement.same_top1 as f64 / result.scored as f64,
            agreement.same_top1,
            result.scored
        );
        println!(
            "mean KL divergence from the reference: {:.6}",
            agreement.mean_kl
        );
    }
    println!("perplexity: {:.4}", result.perplexity);
    Ok(())
}
