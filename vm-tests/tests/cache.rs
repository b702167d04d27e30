//! The build cache: one build per set of inputs, a rebuild when an input
//! changes, and a failed build leaves nothing behind.

use std::fs;
use std::path::PathBuf;

use sovereign_vm_tests::cached_build;

fn command(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[test]
fn a_build_runs_once_per_inputs_and_again_when_an_input_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::env::set_var("SOVEREIGN_VM_CACHE", dir.path().join("cache"));
    let input = dir.path().join("spec.toml");
    fs::write(&input, "profile = \"test\"\n").expect("input");
    let counter = dir.path().join("builds");
    let script = format!(
        "echo built >> {counter}; cp {input} {{out}}/node.img",
        counter = counter.display(),
        input = input.display()
    );
    let inputs: Vec<PathBuf> = vec![input.clone()];
    let first = cached_build("node", &command(&script), &inputs).expect("build");
    let second = cached_build("node", &command(&script), &inputs).expect("reuse");
    assert_eq!(first, second);
    assert_eq!(fs::read_to_string(&counter).expect("counter"), "built\n");
    assert_eq!(
        fs::read_to_string(first.join("node.img")).expect("artifact"),
        "profile = \"test\"\n"
    );

    fs::write(&input, "profile = \"production\"\n").expect("change input");
    let third = cached_build("node", &command(&script), &inputs).expect("rebuild");
    assert_ne!(third, first);
    assert_eq!(
        fs::read_to_string(&counter).expect("counter"),
        "built\nbuilt\n"
    );
    assert!(!first.exists(), "the stale build is removed");

    let error = cached_build("broken", &command("echo oops >&2; exit 3"), &inputs)
        .expect_err("a failing build");
    assert!(error.to_string().contains("oops"), "{error}");
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("cache"))
        .expect("cache dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("broken-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
