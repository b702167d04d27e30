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

#[test]
fn perplexity_matches_llama_cpp_within_one_percent() {
    let lab = Lab::new();
    lab.import_demo_model();
    let out = lab
        .run(&[
            "perplexity",
            "--store",
            "store",
            "--model",
            "smollm2",
            "--ctx",
            "512",
            "--chunks",
            "4",
            TEXT,
        ])
        .ok();
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
    lab.run(&[
        "perplexity",
        "--store",
        "store",
        "--model",
        "smollm2",
        "short.txt",
    ])
    .refused("at least 512 are needed");
    lab.run(&[
        "perplexity",
        "--store",
        "store",
        "--model",
        "smollm2",
        "--ctx",
        "2",
        TEXT,
    ])
    .refused("too small");
    lab.run(&[
        "perplexity",
        "--store",
        "store",
        "--model",
        "smollm2",
        "missing.txt",
    ])
    .refused("missing.txt");
}
