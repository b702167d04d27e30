//! Distributed generation in one process: three cores joined by in-process
//! links (the frames are encoded and decoded as on the ring) run the real
//! demo model and give the logits of one whole-model stage bit for bit, also
//! when the middle node is lost mid-stream and the entry replays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use sovereign_inference::{Executor, Footprint, ModelConfig, Sampler, Stage, Work};
use sovereign_node::plan::{compute, Candidate, Isa, Plan};
use sovereign_node::{Core, Links, RingExecutor};

fn demo_model() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script).output().unwrap();
    assert!(out.status.success(), "fetch-model failed");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Links between cores of this process: each frame is delivered as bytes.
#[derive(Clone, Default)]
struct InProcess(Arc<Mutex<HashMap<String, Weak<Core>>>>);

impl Links for InProcess {
    fn send(&self, to: &str, payload: Vec<u8>) -> Result<(), String> {
        let core = self.0.lock().unwrap().get(to).and_then(Weak::upgrade);
        let core = core.ok_or_else(|| format!("{to} is gone"))?;
        // Deliver from another thread, as a transport would.
        let to = to.to_owned();
        std::thread::spawn(move || {
            let _ = core.deliver(&to, &payload);
        });
        Ok(())
    }
}

fn plan(footprint: &Footprint, names: &[&str]) -> Plan {
    let nodes: Vec<Candidate> = names
        .iter()
        .map(|n| Candidate {
            name: (*n).into(),
            memory_budget: 1 << 30,
            versions: vec![semver::Version::new(1, 0, 0)],
            isa: Isa::detect(),
        })
        .collect();
    compute(&semver::Version::new(1, 0, 0), footprint, &nodes).unwrap()
}

/// Greedy decoding with the whole model in one stage: the reference.
fn reference(path: &std::path::Path, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let stage = Stage::load(path, 0..30).unwrap();
    let mut cache = stage.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let hidden = stage
            .run_layers(stage.embed(&input).unwrap(), &mut cache)
            .unwrap();
        let logits = stage.head(&hidden).unwrap().to_vec1::<f32>().unwrap();
        input = vec![argmax(&logits)];
        out.push(logits);
    }
    out
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn a_ring_gives_one_stages_logits_and_survives_a_lost_middle_node() {
    let path = demo_model();
    let footprint = Footprint::of(&path).unwrap();
    let config = ModelConfig::of(&path).unwrap();
    // <|im_start|>user\nWhat is the capital of France?...<|im_start|>assistant\n
    let prompt = [
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let steps = 8;
    let expected = reference(&path, &prompt, steps);

    let links = InProcess::default();
    let names = ["a", "b", "c"];
    let cores: Vec<Arc<Core>> = names
        .iter()
        .map(|n| Core::start((*n).into(), config.clone(), Box::new(links.clone())))
        .collect();
    for core in &cores {
        links
            .0
            .lock()
            .unwrap()
            .insert(core.name().into(), Arc::downgrade(core));
    }
    let three = plan(&footprint, &names);
    assert_eq!(three.stages.len(), 3);
    for core in &cores {
        core.set_plan(Some(three.clone()), path.clone());
    }
    // The entry is the last node: tokens go to a, hidden states a -> b -> c,
    // logits come back to c.
    let mut executor = RingExecutor::new(Arc::clone(&cores[2]));
    let mut logits = Vec::new();
    let mut input = prompt.to_vec();
    let mut position = 0;
    for (i, want) in expected.iter().enumerate() {
        if i == steps / 2 {
            // b is lost: a and c re-plan without it; the entry replays.
            links.0.lock().unwrap().remove("b");
            let two = plan(&footprint, &["a", "c"]);
            cores[0].set_plan(Some(two.clone()), path.clone());
            cores[2].set_plan(Some(two), path.clone());
        }
        let work = [Work {
            seq: 7,
            tokens: &input,
            position,
            logits: true,
        }];
        executor.step(&work, &mut logits).unwrap();
        assert!(
            same_bits(&logits, want),
            "step {i}: the ring's logits differ"
        );
        position += input.len();
        input = vec![argmax(&logits)];
    }
    let replays = cores[2]
        .counters
        .replays
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(replays >= 1, "the lost node caused no replay");
    // A second sequence on a one-node ring gives the same first logits.
    let one = plan(&footprint, &["c"]);
    cores[2].set_plan(Some(one), path.clone());
    let work = [Work {
        seq: 8,
        tokens: &prompt,
        position: 0,
        logits: true,
    }];
    executor.step(&work, &mut logits).unwrap();
    assert!(same_bits(&logits, &expected[0]));
    // A sequence that starts from another's prefix (the executor boundary's
    // copy_prefix) gets the stages' caches by replay: same logits.
    let split = prompt.len() - 2;
    executor.copy_prefix(8, 9, split).unwrap();
    let work = [Work {
        seq: 9,
        tokens: &prompt[split..],
        position: split,
        logits: true,
    }];
    executor.step(&work, &mut logits).unwrap();
    assert!(same_bits(&logits, &expected[0]), "after copy_prefix");
    assert!(executor.copy_prefix(8, 10, prompt.len() + 1).is_err());
    // The last stage samples when asked (no logits cross the ring): greedy
    // gives the argmax of the logits one stage gives.
    let work = Work {
        seq: 11,
        tokens: &prompt,
        position: 0,
        logits: true,
    };
    let token = executor.step_sampled(work, &Sampler::default()).unwrap();
    assert_eq!(token, argmax(&expected[0]));
}
