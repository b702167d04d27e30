//! Batch invariance on the real demo model: a row's logits do not depend on
//! the batch or prefill chunk it is computed in, so every sequence in a batch
//! gets exactly the tokens it gets alone, whoever joins or leaves, however
//! its prompt is chunked, and whether or not it was preempted or reused a
//! cached prefix.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use sovereign_inference::{
    ChatMessage, Engine, EventSink, FinishReason, GenerateParams, Generation, InferenceError,
    Request, Sampler, Scheduler, SchedulerConfig, Stage, TokenLogprob,
};

fn demo_model() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script)
        .output()
        .expect("run scripts/fetch-model");
    assert!(out.status.success(), "fetch-model failed");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

fn chat(engine: &Engine, text: &str) -> Vec<u32> {
    engine
        .chat_tokens(&[ChatMessage::new("user", text)])
        .unwrap()
}

#[test]
fn prefill_of_n_tokens_equals_n_single_token_decodes_bit_for_bit() {
    let path = demo_model();
    let stage = Stage::load(&path, 0..30).unwrap();
    let engine = Engine::load(&path).unwrap();
    let tokens = chat(
        &engine,
        "Name three rivers of Europe and the seas they reach.",
    );
    let n = tokens.len();
    let all_rows: Vec<usize> = (0..n).collect();

    // One prefill of all n tokens, logits of every row.
    let mut cache = stage.new_cache();
    let hidden = stage
        .run_layers(stage.embed(&tokens).unwrap(), &mut cache)
        .unwrap();
    let mut prefill = Vec::new();
    stage.head_logits(&hidden, &all_rows, &mut prefill).unwrap();

    // n single-token steps.
    let mut cache = stage.new_cache();
    let mut decode = Vec::new();
    for &t in &tokens {
        let hidden = stage
            .run_layers(stage.embed(&[t]).unwrap(), &mut cache)
            .unwrap();
        let mut logits = Vec::new();
        stage.head_logits(&hidden, &[0], &mut logits).unwrap();
        decode.extend(logits);
    }
    assert_eq!(prefill.len(), decode.len());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&prefill) == bits(&decode),
        "prefill and decode logits differ"
    );

    // Uneven chunks (5, 3, rest) give the same bits too.
    let mut cache = stage.new_cache();
    let mut chunked = Vec::new();
    for part in [&tokens[..5], &tokens[5..8], &tokens[8..]] {
        let hidden = stage
            .run_layers(stage.embed(part).unwrap(), &mut cache)
            .unwrap();
        let rows: Vec<usize> = (0..part.len()).collect();
        let mut logits = Vec::new();
        stage.head_logits(&hidden, &rows, &mut logits).unwrap();
        chunked.extend(logits);
    }
    assert!(bits(&chunked) == bits(&prefill), "chunked prefill differs");
    // And the logits are a real model's: the rows differ from each other.
    let vocab = engine.config().vocab;
    assert_ne!(bits(&prefill[..vocab]), bits(&prefill[vocab..2 * vocab]));
}

/// Collects a request's text and outcome, and signals its first text.
struct Collect {
    text: String,
    first: Option<mpsc::Sender<()>>,
    done: mpsc::Sender<(usize, Result<Generation, InferenceError>, String)>,
    index: usize,
}

impl EventSink for Collect {
    fn text(&mut self, text: &str, _logprobs: &[TokenLogprob]) -> bool {
        self.text.push_str(text);
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
        true
    }
    fn done(&mut self, result: Result<Generation, InferenceError>) {
        let _ = self
            .done
            .send((self.index, result, std::mem::take(&mut self.text)));
    }
}

#[test]
fn batched_sequences_get_exactly_their_tokens_alone() {
    let engine = Arc::new(Engine::load(&demo_model()).unwrap());
    let greedy = |max_tokens| GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    };
    let seeded = |max_tokens, seed| GenerateParams {
        max_tokens,
        sampler: Sampler {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed,
        },
        ..GenerateParams::default()
    };
    let system = "You are a terse assistant for a small law firm. Answer in one sentence.";
    let requests: Vec<(Vec<u32>, GenerateParams)> = vec![
        (
            chat(&engine, "What is the capital of France? Answer in one sentence."),
            greedy(20),
        ),
        (
            chat(&engine, "Write a long list of fruits, one per line, with their colours."),
            seeded(28, 11),
        ),
        (chat(&engine, "2+2="), greedy(6)),
        (
            engine
                .tokenize(&format!(
                    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is a contract?<|im_end|>\n<|im_start|>assistant\n"
                ))
                .unwrap(),
            seeded(16, 3),
        ),
        (
            engine
                .tokenize(&format!(
                    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is a tort?<|im_end|>\n<|im_start|>assistant\n"
                ))
                .unwrap(),
            greedy(16),
        ),
    ];
    let alone: Vec<Generation> = requests
        .iter()
        .map(|(prompt, params)| engine.generate(prompt, params, &mut |_| true).unwrap())
        .collect();
    assert!(alone[0].text.contains("Paris"), "{:?}", alone[0].text);

    // Batched, with small prefill chunks; the first two start together, the
    // others join once the first has streamed text. A second scheduler's KV
    // budget holds the prompts but not their growth: all start at once, and
    // sequences are preempted and recomputed.
    let bpp = sovereign_inference::bytes_per_position(engine.config());
    let prompts: u64 = requests.iter().map(|r| r.0.len() as u64 + 1).sum();
    for (budget, chunk) in [(1u64 << 30, 7usize), ((prompts + 12) * bpp, 16)] {
        let scheduler = Scheduler::start(
            Arc::clone(&engine),
            SchedulerConfig {
                max_batch: 8,
                prefill_chunk: chunk,
                kv_budget_bytes: budget,
                prefix_cache_bytes: 64 << 20,
            },
        );
        let (done_tx, done_rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::channel();
        let submit = |i: usize, first: Option<mpsc::Sender<()>>| {
            let (prompt, params) = requests[i].clone();
            scheduler
                .submit(Request {
                    prompt,
                    params,
                    processor: None,
                    sink: Box::new(Collect {
                        text: String::new(),
                        first,
                        done: done_tx.clone(),
                        index: i,
                    }),
                })
                .unwrap();
        };
        submit(0, Some(first_tx));
        submit(1, None);
        if budget == 1 << 30 {
            first_rx.recv().unwrap();
        }
        for i in 2..requests.len() {
            submit(i, None);
        }
        let mut got = 0;
        while got < requests.len() {
            let (i, result, streamed) = done_rx.recv().unwrap();
            let batched = result.unwrap();
            assert_eq!(
                (&batched.text, batched.completion_tokens, batched.finish),
                (&alone[i].text, alone[i].completion_tokens, alone[i].finish),
                "request {i} differs in a batch (budget {budget})"
            );
            assert_eq!(streamed, batched.text, "request {i}'s stream");
            got += 1;
        }
        let stats = scheduler.stats();
        assert!(stats.steps.load(Ordering::Relaxed) > 0);
        if budget < 1 << 30 {
            assert!(
                stats.preempted.load(Ordering::Relaxed) > 0,
                "the small budget preempted nothing"
            );
        }
    }
}

/// Runs one request on `scheduler` and waits for its outcome.
fn generate_blocking(
    scheduler: &Scheduler,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<Generation, InferenceError> {
    let (done, result) = mpsc::channel();
    scheduler
        .submit(Request {
            prompt,
            params,
            processor: None,
            sink: Box::new(Collect {
                text: String::new(),
                first: None,
                done,
                index: 0,
            }),
        })
        .unwrap();
    result.recv().unwrap().1
}

#[test]
fn a_second_turn_reuses_the_first_turns_cache_and_answers_the_same() {
    let engine = Arc::new(Engine::load(&demo_model()).unwrap());
    let scheduler = Scheduler::start(Arc::clone(&engine), SchedulerConfig::default());
    let params = GenerateParams {
        max_tokens: 12,
        ..GenerateParams::default()
    };
    let first_turn = chat(&engine, "Which planet is the largest?");
    let answer = generate_blocking(&scheduler, first_turn.clone(), params.clone()).unwrap();
    assert_eq!(answer.finish, FinishReason::Length);
    let second = engine
        .chat_tokens(&[
            ChatMessage::new("user", "Which planet is the largest?"),
            ChatMessage::new("assistant", answer.text.clone()),
            ChatMessage::new("user", "And the smallest?"),
        ])
        .unwrap();
    let before = scheduler.stats().prefix_hit_tokens.load(Ordering::Relaxed);
    let reused = generate_blocking(&scheduler, second.clone(), params.clone()).unwrap();
    let hit = scheduler.stats().prefix_hit_tokens.load(Ordering::Relaxed) - before;
    assert!(
        hit as usize >= first_turn.len() - 1,
        "reused {hit} of the first turn's {} tokens",
        first_turn.len()
    );
    let fresh = engine.generate(&second, &params, &mut |_| true).unwrap();
    assert_eq!(reused.text, fresh.text);
}
