//! `sovereign generate`: answer a prompt with a model from the store, streaming.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use sovereign_inference::{ChatMessage, Engine, GenerateParams, Sampler};

/// Generate arguments.
#[derive(Args)]
pub struct GenerateArgs {
    /// The model store directory.
    #[arg(long)]
    store: PathBuf,
    /// The model name (its newest version is used).
    #[arg(long)]
    model: String,
    /// The user's message (or, with --raw, the whole prompt).
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Stop before this text; repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// Use the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Compute threads (default 1: on 2-core nodes the matmuls are memory-bound
    /// at one thread, and one thread is immune to a busy second core; see BENCHMARKS.md).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print prompt and decode speed on stderr.
    #[arg(long)]
    stats: bool,
    /// Record the model load and the request's metadata (never the prompt) in this audit log.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The node name recorded in a new audit log.
    #[arg(long, default_value = "dev")]
    node: String,
}

/// Runs a generation, printing text as it is produced.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(
        args.temperature >= 0.0,
        "--temperature must not be negative"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.top_p) && args.top_p > 0.0,
        "--top-p must be in (0, 1]"
    );
    // Read by candle's thread pool (which the kernels share) on first use.
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    let audit = args
        .audit_log
        .as_deref()
        .map(|dir| sovereign_audit::AuditLog::open(dir, &args.node).map(Arc::new))
        .transpose()?;
    let model = sovereign_store::live_model(&args.store, &args.model)?;
    let engine = Engine::load(&Engine::locate(&model.dir, &model.files)?)?;
    if let Some(log) = &audit {
        log.record(sovereign_audit::Event::new(
            "inference",
            "model-loaded",
            serde_json::json!({ "model": format!("{}@{}", model.name, model.version), "layers": engine.config().layers }),
        ))?;
    }
    let tokens = if args.raw {
        engine.tokenize(&args.prompt)?
    } else {
        engine.chat_tokens(&[ChatMessage::new("user", args.prompt.clone())])?
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampler: Sampler {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        ..GenerateParams::default()
    };
    let mut stdout = std::io::stdout().lock();
    let generation = engine.generate(&tokens, &params, &mut |text| {
        stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
            .is_ok()
    })?;
    writeln!(stdout)?;
    if let Some(log) = &audit {
        log.record(sovereign_audit::Event::new(
            "inference",
            "generate-request",
            serde_json::json!({
                "model": format!("{}@{}", model.name, model.version),
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "finish": format!("{:?}", generation.finish).to_lowercase(),
            }),
        ))?;
    }
    if args.stats {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        // Decode time covers the tokens after the first (the first comes from the prefill).
        let decoded = generation.completion_tokens.saturating_sub(1);
        eprintln!(
            "stats: prompt {} tokens {:.3} s {:.1} tok/s; decode {} tokens {:.3} s {:.1} tok/s",
            generation.prompt_tokens,
            generation.prompt_seconds,
            rate(generation.prompt_tokens, generation.prompt_seconds),
            decoded,
            generation.decode_seconds,
            rate(decoded, generation.decode_seconds)
        );
        let paths: Vec<String> = engine
            .matrix_paths()
            .into_iter()
            .map(|(path, count)| format!("{path} {count}"))
            .collect();
        eprintln!("matrices: {}", paths.join(", "));
    }
    Ok(())
}
