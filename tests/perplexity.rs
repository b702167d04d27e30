//! `sovereign perplexity` on the real demo model against llama.cpp's
//! `llama-perplexity` on the same text.

mod support;

use support::Lab;

/// The GPL's text, on every Debian machine.
const TEXT: &str = "/usr/share/common-licenses/GPL-3";

/// `llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f GPL-3 -c 512
/// --chunks 4` (llama.cpp of llama-cpp-python 0.3.36, built by
/// bench/build-llama-cpp): "Final estimate: PPL = 18.2554 +/- 1.54930".
const LLAMA_PPL: f64 = 18.2554;

/// `sovereign perplexity --store store --model smollm2 ARGS...`.
fn perplexity(lab: &Lab, args: &[&str]) -> support::Run {
    let mut all = vec!["perplexity", "--store", "store", "--model", "smollm2"];
    all.extend_from_slice(args);
    lab.run(&all)
}

#[test]
fn perplexity_matches_llama_cpp_within_one_percent() {
    let lab = Lab::new();
    lab.import_demo_model();
    let out = perplexity(&lab, &["--ctx", "512", "--chunks", "4", TEXT]).ok();
    let last = out.stdout.lines().last().expect("output");
    let ppl: f64 = last
        .strip_prefix("perplexity: ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("last line is not `perplexity: X`: {last}"));
    assert!(
        (ppl / LLAMA_PPL - 1.0).abs() <= 0.01,
        "perplexity {ppl}, llama.cpp {LLAMA_PPL}"
    );
    assert!(
        out.stdout.contains("scored 1020 tokens in 4 chunks"),
        "{}",
        out.stdout
    );

    std::fs::write(lab.path("short.txt"), "Too short to fill one chunk.").expect("write");
    perplexity(&lab, &["short.txt"]).refused("at least 512 are needed");
    perplexity(&lab, &["--ctx", "2", TEXT]).refused("too small");
    perplexity(&lab, &["missing.txt"]).refused("missing.txt");
}

/// Writes a reference file as `llama-perplexity --kl-divergence-base` does,
/// for `chunks` chunks of `ctx` made-up tokens over `vocab`, each scored
/// position's distribution all on the actual next token (log-probability 0;
/// every other token at the -16 floor, which the comparison leaves out).
fn one_hot_reference(path: &std::path::Path, ctx: usize, vocab: usize, chunks: usize) {
    let tokens: Vec<i32> = (0..ctx * chunks)
        .map(|i| ((i * 7919 + 13) % vocab) as i32)
        .collect();
    let mut out = b"_logits_".to_vec();
    for v in [ctx, vocab, chunks] {
        out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    for t in &tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    let first = ctx / 2;
    for c in 0..chunks {
        for i in first..ctx - 1 {
            let next = tokens[c * ctx + i + 1] as usize;
            out.extend_from_slice(&1f32.to_le_bytes());
            out.extend_from_slice(&(-16f32).to_le_bytes());
            let mut q = vec![0u16; 2 * vocab.div_ceil(2)];
            q[next] = 16;
            for v in q {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    std::fs::write(path, out).expect("write reference");
}

/// The number after `prefix` on the line that starts with it.
fn value(stdout: &str, prefix: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {stdout}"))
        .to_owned()
}

#[test]
fn a_reference_run_is_compared_position_by_position() {
    let lab = Lab::new();
    lab.import_demo_model();
    // With the reference all on the actual next token, its KL divergence
    // from ours is our negative log-likelihood there, so the mean KL is
    // ln(perplexity), and "same top-1" counts where we rank the text's token first.
    one_hot_reference(&lab.path("one-hot.kld"), 16, 49152, 3);
    let out = perplexity(&lab, &["--reference", "one-hot.kld"]).ok();
    assert!(
        out.stdout.contains("scored 21 tokens in 3 chunks of 16"),
        "{}",
        out.stdout
    );
    let ppl: f64 = value(&out.stdout, "perplexity: ").parse().unwrap();
    let kl: f64 = value(&out.stdout, "mean KL divergence from the reference: ")
        .parse()
        .unwrap();
    assert!(
        (kl - ppl.ln()).abs() < 1e-3,
        "KL {kl}, ln(perplexity) {}",
        ppl.ln()
    );
    let with_text = value(
        &out.stdout,
        "scored 21 tokens in 3 chunks of 16; top-1 agreement with the text ",
    );
    let with_reference = value(&out.stdout, "same top-1 as the reference: ");
    assert!(
        with_reference.starts_with(&with_text),
        "{with_reference} vs {with_text}"
    );

    // Bad references are refused before any work, naming the problem.
    one_hot_reference(&lab.path("small-vocab.kld"), 16, 100, 1);
    perplexity(&lab, &["--reference", "small-vocab.kld"]).refused("vocabulary of 100 tokens");
    std::fs::write(
        lab.path("garbage.kld"),
        b"_logits_ and then nothing sensible",
    )
    .expect("write");
    perplexity(&lab, &["--reference", "garbage.kld"]).refused("garbage.kld");
    perplexity(&lab, &["--ctx", "32", "--reference", "one-hot.kld"])
        .refused("differs from the reference's chunks of 16");
}
