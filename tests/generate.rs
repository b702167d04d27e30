//! `sovereign generate` answers from an imported bundle of the real demo model.

mod support;

use support::Lab;

#[test]
fn generate_answers_from_an_imported_bundle_and_audits_it() {
    let lab = Lab::new();
    lab.import_demo_model();

    let question = "What is the capital of France? Answer in one sentence.";
    let args = [
        "generate",
        "--store",
        "store",
        "--model",
        "smollm2",
        "--prompt",
        question,
        "--max-tokens",
        "24",
    ];
    let answer = lab
        .run(&[&args[..], &["--stats", "--audit-log", "audit"]].concat())
        .ok();
    assert!(answer.stdout.contains("Paris"), "{}", answer.stdout);
    let stats = answer
        .stderr
        .lines()
        .find(|l| l.starts_with("stats: prompt "))
        .expect("stats line");
    assert!(stats.contains(" tok/s; decode "), "{stats}");
    // The demo model: 210 Q4_1 matrices and the Q8_0 head, all on the SIMD kernels.
    assert!(
        answer
            .stderr
            .lines()
            .any(|l| l == "matrices: Q4_1 kernel 210, Q8_0 kernel 1"),
        "{}",
        answer.stderr
    );
    assert_eq!(
        lab.run(&args).ok().stdout,
        answer.stdout,
        "greedy output is not stable"
    );

    let log = lab
        .run(&["audit", "show", "--log", "audit", "--json"])
        .ok()
        .stdout;
    assert!(
        log.contains("model-loaded") && log.contains("generate-request"),
        "{log}"
    );
    assert!(
        !log.contains("capital of France"),
        "the prompt text leaked into the audit log"
    );

    lab.run(&[
        "generate", "--store", "store", "--model", "nope", "--prompt", "x",
    ])
    .refused("nope is not in the store");
    lab.run(&[
        "generate", "--store", "store", "--model", "smollm2", "--prompt", "x", "--top-p", "0",
    ])
    .refused("--top-p");
}
